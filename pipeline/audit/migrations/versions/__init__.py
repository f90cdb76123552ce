"""Audit DB revisions, oldest first: 0001 baseline (jobs, runs, items), 0002 event chain and reviewers."""
