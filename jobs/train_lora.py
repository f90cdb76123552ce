"""Ray job entrypoint for LoRA training: ``python -m jobs.train_lora SPEC [--set key=value ...]``.

Usable with ``ray job submit --working-dir . -- python -m jobs.train_lora jobs/train/spec.yaml``; inside a Ray
job RAY_ADDRESS is set, so the Ray Train workers start on the cluster instead of a local Ray.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]]))
