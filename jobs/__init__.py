"""Ray job entrypoints (``python -m jobs.<name>``) and the bundled example specs and manifests."""
