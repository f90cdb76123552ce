"""The bundled LoRA training example: ``spec.yaml`` and the synthetic dataset writer ``make_dataset``."""
