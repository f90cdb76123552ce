"""Training data: read captioned images (Parquet, a folder with `.txt` captions, or the synthetic shapes), skip and
count the unusable ones, hold out the evaluation samples, and cut deterministic per-worker batches.

Samples keep their encoded bytes (small) and are decoded per batch. Every image is decoded once while loading,
so an unreadable or truncated one is skipped with a reason here instead of crashing a worker mid-run. The data
order is a pure function of (seed, epoch, worker rank), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.errors import GenpipeError
from pipeline.storage import open_input
from schemas.train import MIN_TRAIN_SAMPLES, DatasetSpec, TrainSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: How many skipped samples the report names (the counts cover all of them).
MAX_SKIP_EXAMPLES = 20


class DatasetError(GenpipeError):
    """The dataset cannot be trained on: missing, unreadable as a whole, wrong columns, or too few samples."""


@dataclass(frozen=True)
class Sample:
    """One captioned image: where it came from (for messages), its caption and its encoded bytes."""

    source: str
    caption: str
    image: bytes


@dataclass
class TrainData:
    """The usable samples split into training and held-out, and what was skipped (reason → count)."""

    train: list[Sample]
    holdout: list[Sample]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.train) + len(self.holdout) + sum(self.skipped.values())

    def summary(self) -> dict:
        return {
            "total": self.total,
            "train": len(self.train),
            "holdout": len(self.holdout),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.skipped_examples),
        }


# --- reading --------------------------------------------------------------------------------------------------


def load_data(spec: TrainSpec) -> TrainData:
    """Read, check and split the dataset of ``spec``; raises ``DatasetError`` when too few samples remain."""
    skipped: Counter = Counter()
    examples: list[str] = []
    usable: list[Sample] = []
    digests: list[bytes] = []
    first_of: dict[tuple[bytes, str], str] = {}  # (image sha256, caption) -> the sample's first source
    for source, caption, image, problem in iter_raw(spec.dataset):
        problem = problem or caption_problem(caption) or image_problem(image)
        if not problem:
            digest = hashlib.sha256(image).digest()
            first = first_of.setdefault((digest, caption.strip()), source)
            problem = None if first == source else "duplicate (same image and caption)"
        if problem:
            skipped[problem] += 1
            if len(examples) < MAX_SKIP_EXAMPLES:
                examples.append(f"{source}: {problem}" + (f" of {first}" if problem.startswith("duplicate") else ""))
            continue
        usable.append(Sample(source, caption.strip(), image))
        digests.append(digest)
    # Held-out samples must be unseen in training: copies of one image (with other captions) stay on one side.
    groups: dict[bytes, list[int]] = {}
    for i, digest in enumerate(digests):
        groups.setdefault(digest, []).append(i)
    keys = list(groups)
    random.Random(spec.seed).shuffle(keys)
    held: set[int] = set()
    for key in keys:
        if len(held) >= spec.holdout:
            break
        held.update(groups[key])
    holdout = [s for i, s in enumerate(usable) if i in held]
    train = [s for i, s in enumerate(usable) if i not in held]
    data = TrainData(train, holdout, skipped, examples)
    if len(train) < MIN_TRAIN_SAMPLES:
        skipped_text = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"
        raise DatasetError(
            f"dataset {describe(spec.dataset)}: {len(train)} samples to train on, at least {MIN_TRAIN_SAMPLES} are "
            f"needed ({data.total} read, skipped: {skipped_text}; {len(holdout)} held out by evaluation.holdout)",
            problems=examples,
        )
    return data


def describe(dataset: DatasetSpec) -> str:
    if dataset.synthetic is not None:
        s = dataset.synthetic
        return f"synthetic {s.kind} (count {s.count}, size {s.size}, seed {s.seed})"
    return repr(dataset.path)


def caption_problem(caption: object) -> str | None:
    if caption is None:
        return "missing caption"
    if not isinstance(caption, str):
        return "caption is not text"
    if not caption.strip():
        return "empty caption"
    return None


def image_problem(data: bytes | None) -> str | None:
    """None when the bytes decode to a non-empty image (fully: a truncated file fails here, not mid-training)."""
    from PIL import Image

    if not data:
        return "empty image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return "unreadable image"
            if img.mode in ("I", "F"):
                # 32-bit integer or float pixels have no fixed white: converting clamps them (mid-grey turns
                # white or black), so the model would learn wrong pixels.
                return f"unsupported pixel format {img.mode} (32-bit {'float' if img.mode == 'F' else 'integer'})"
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError...)
        return "unreadable image"
    return None


def iter_raw(dataset: DatasetSpec) -> Iterator[tuple[str, object, bytes | None, str | None]]:
    """(source, caption, image bytes, problem) for every sample, before any check."""
    if dataset.synthetic is not None:
        from pipeline.train.synthetic import shapes

        s = dataset.synthetic
        for i, (png, caption) in enumerate(shapes(s.count, s.size, s.seed)):
            yield f"shape {i}", caption, png, None
        return
    try:
        fs, root = _fs(dataset.path)
        if not fs.exists(root):
            raise DatasetError(f"dataset.path: {dataset.path!r} does not exist")
        is_dir = fs.isdir(root)
        parquet_files = [root] if not is_dir else sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    except DatasetError:
        raise
    except Exception as exc:  # fsspec backends raise their own kinds (no credentials, unknown protocol, denied)
        raise DatasetError(f"dataset.path: {dataset.path!r} cannot be read: {type(exc).__name__}: {exc}") from None
    fmt = dataset.format
    if fmt == "auto":
        fmt = "parquet" if root.endswith(".parquet") or (is_dir and parquet_files) else "folder"
    if fmt == "parquet":
        if not parquet_files:
            raise DatasetError(f"dataset.path: {dataset.path!r} holds no .parquet files")
        for path in parquet_files:
            yield from _iter_parquet(fs, path, dataset)
    else:
        if not is_dir:
            raise DatasetError(f"dataset.path: {dataset.path!r} is a file; a folder dataset is a directory")
        yield from _iter_folder(fs, root)


def _fs(url: str):
    from fsspec.core import url_to_fs

    from pipeline.storage import local_path

    lp = local_path(url)
    return url_to_fs(lp if lp is not None else url)


def _iter_parquet(fs, path: str, dataset: DatasetSpec) -> Iterator[tuple[str, object, bytes | None, str | None]]:
    import pyarrow.parquet as pq

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    shown = path if protocol in ("file", "local") else fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            missing = [c for c in (dataset.image_column, dataset.caption_column) if c not in names]
            if missing:
                raise DatasetError(
                    f"dataset {shown}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(names)} "
                    "(set dataset.image_column / dataset.caption_column)"
                )
            row = 0
            for batch in pf.iter_batches(batch_size=64, columns=[dataset.image_column, dataset.caption_column]):
                images = batch.column(0).to_pylist()
                captions = batch.column(1).to_pylist()
                for image, caption in zip(images, captions, strict=True):
                    data, problem = _image_bytes(image, fs, posixpath.dirname(path))
                    yield f"{posixpath.basename(path)} row {row}", caption, data, problem
                    row += 1
    except DatasetError:
        raise
    except Exception as exc:  # ArrowInvalid on a corrupt or truncated file, OSError from the store
        raise DatasetError(f"dataset {shown}: cannot read it as Parquet: {exc}".replace("\n", " ")) from None


def _image_bytes(value: object, fs, base: str) -> tuple[bytes | None, str | None]:
    """Bytes of a Parquet image cell: bytes, a URI / path (relative to the Parquet's directory), or a
    ``{"bytes": ..., "path": ...}`` struct. A URI that cannot be fetched is a skip reason, not an error."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        return None, "missing image"
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if not isinstance(value, str) or not value.strip():
        return None, "missing image"
    uri = value.strip()
    try:
        if "://" in uri or uri.startswith("/"):
            with open_input(uri) as fh:
                return fh.read(), None
        with fs.open(posixpath.join(base, uri), "rb") as fh:
            return fh.read(), None
    except Exception:  # missing object, no credentials, unknown protocol
        return None, "image URI not readable"


def _iter_folder(fs, root: str) -> Iterator[tuple[str, object, bytes | None, str | None]]:
    files = sorted(fs.find(root))
    present = set(files)
    for path in files:
        if not path.lower().endswith(IMAGE_SUFFIXES):
            continue
        rel = posixpath.relpath(path, root)
        text_path = posixpath.splitext(path)[0] + ".txt"
        if text_path not in present:
            yield rel, None, None, "missing caption"
            continue
        try:
            caption = fs.cat_file(text_path).decode("utf-8-sig")  # a byte order mark is not part of the caption
        except UnicodeDecodeError:
            yield rel, None, None, "caption is not UTF-8"
            continue
        try:
            data = fs.cat_file(path)
        except OSError:
            yield rel, caption, None, "unreadable image"
            continue
        yield rel, caption, data, None


# --- batches --------------------------------------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Forward passes per worker per epoch: each worker sees ceil(n / world) samples (the last ones wrap)."""
    return math.ceil(math.ceil(n / world) / batch_size)


def batch_indices(n: int, batch_size: int, world: int, rank: int, seed: int, micro: int) -> tuple[int, list[int]]:
    """(epoch, sample indices) of the ``micro``-th forward pass of worker ``rank``. Each epoch is a permutation
    seeded by (seed, epoch), padded by wrapping to a multiple of ``world`` and dealt round-robin, like
    torch's DistributedSampler; every worker computes its own share without talking to the others."""
    per_epoch = batches_per_epoch(n, batch_size, world)
    epoch, j = divmod(micro, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    per_worker = math.ceil(n / world)
    order = (order * math.ceil(per_worker * world / n))[: per_worker * world]  # fewer samples than workers: cycle
    mine = order[rank::world]
    return epoch, mine[j * batch_size : (j + 1) * batch_size]


def _as_rgb(img):
    """8-bit RGB. 16-bit greyscale (PNG ``I;16``) is scaled to 8 bits first: ``convert`` would clamp it, and
    every pixel above 255 of 65535 would turn white."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def pixel_tensor(sample: Sample, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """(3, R, R) float tensor in [-1, 1]: short side resized to R (bilinear), cropped square, maybe flipped."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(sample.image)) as img:
        img = _as_rgb(img)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    else:
        left, top = rng.randint(0, img.width - resolution), rng.randint(0, img.height - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
