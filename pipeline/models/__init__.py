"""Model loaders and the tiny offline models: thin load + forward wrappers, no batching or thresholds."""
