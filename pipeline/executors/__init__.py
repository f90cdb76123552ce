"""Executors run a list of stages: in-process (``local``) or on Ray Data (``ray_data``)."""
