"""Pydantic contracts: the job spec, the manifest row and the record — the only place they are defined."""
