"""Stages: small classes with a name, resources, ``setup()`` and one batch method."""
