"""Ray job entrypoint: ``python -m jobs.generate SPEC [--set key=value ...]``.

Usable directly with ``ray job submit --working-dir . -- python -m jobs.generate jobs/demo/spec.yaml``; inside
a Ray job, RAY_ADDRESS is set, so the run attaches to the cluster instead of starting a local Ray.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
