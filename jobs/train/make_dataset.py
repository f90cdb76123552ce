"""Writes the synthetic coloured-shapes dataset as a training spec can read it: a Parquet of PNG bytes + captions,
or a folder of PNGs with same-stem ``.txt`` captions. Nothing generated here is committed; the bundled spec
draws the same images at run time (``dataset.synthetic``), this script is for trying the file-based readers.

Run: ``python -m jobs.train.make_dataset runs/train-data/shapes.parquet`` (or ``--folder runs/train-data/shapes``),
then point ``dataset.path`` at the output (``--set dataset.path=... --set dataset.synthetic=null``).
"""

from __future__ import annotations

import argparse
import os

import pyarrow.parquet as pq

from pipeline.storage import Storage
from pipeline.train.synthetic import shapes, shapes_table


def write_parquet(url: str, count: int = 64, size: int = 64, seed: int = 0) -> str:
    """The shapes as one Parquet file at ``url`` (any fsspec URL), written atomically."""
    import io

    buf = io.BytesIO()
    pq.write_table(shapes_table(count, size, seed), buf)
    parent, name = os.path.split(url.rstrip("/"))
    return Storage(parent or ".").write_atomic(name, buf.getvalue())


def write_folder(url: str, count: int = 64, size: int = 64, seed: int = 0) -> str:
    """``shape-NNNN.png`` + ``shape-NNNN.txt`` per sample under ``url``."""
    store = Storage(url)
    for i, (png, caption) in enumerate(shapes(count, size, seed)):
        store.write_atomic(f"shape-{i:04d}.png", png)
        store.write_atomic(f"shape-{i:04d}.txt", caption.encode())
    return store.root_url


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Parquet file URL, or a directory with --folder")
    parser.add_argument("--folder", action="store_true", help="write PNG + .txt files instead of one Parquet")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write = write_folder if args.folder else write_parquet
    return write(args.out, args.count, args.size, args.seed)


if __name__ == "__main__":
    print(main())
