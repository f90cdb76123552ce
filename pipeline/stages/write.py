"""ImageWriter: encodes generated pixels, embeds the generation metadata, stores the image atomically.

Keys are deterministic (``{prefix}/{prompt_id}/{prompt_id}-{sample:04d}-{item_id[:8]}.{ext}``) so a retried
or resumed write lands on the same object instead of creating a second one. The sha256 of the exact bytes
stored is recorded on the item.

The prefix follows the policy decision, and ``image_key`` is the one place that decides it: only ``pass`` (or
an unscored item, when scoring is off) goes under the public ``images/``; ``review`` goes under ``review/`` and
``block`` under ``quarantine/``. Nothing flagged is ever written under the public prefix, and nothing is deleted
or altered: a flagged image is stored byte for byte like a passed one, just elsewhere. The image of a record
``superseded`` by a rerun with other settings moves under ``superseded/{its prefix}/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, PngImagePlugin

from pipeline.stages.base import Resources, Stage
from pipeline.storage import Storage
from schemas.record import SUPERSEDED, Item

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_ENCODE_THREADS = min(4, (os.cpu_count() or 1) // 4)  # 16 cores: 4; under 8 cores: 1
PUBLIC_PREFIX = "images"
REVIEW_PREFIX = "review"
QUARANTINE_PREFIX = "quarantine"
SUPERSEDED_PREFIX = "superseded"
#: Where each decision's images go; ``None`` is an unscored item (scoring disabled).
PREFIX_BY_DECISION: dict[str | None, str] = {
    None: PUBLIC_PREFIX,
    "pass": PUBLIC_PREFIX,
    "review": REVIEW_PREFIX,
    "block": QUARANTINE_PREFIX,
}
_EXIF_IMAGE_DESCRIPTION = 0x010E


def image_key(item: Item, prefix: str | None = None) -> str:
    """Where an item's image lives, relative to the job root: under the prefix its decision selects (or an
    explicit ``prefix``). ``prompt_id`` was validated as path-safe. An unknown decision raises rather than
    falling back to the public prefix."""
    if prefix is None:
        prefix = PREFIX_BY_DECISION[item.decision]
        if item.status == SUPERSEDED:
            prefix = f"{SUPERSEDED_PREFIX}/{prefix}"
    ext = EXTENSIONS[item.format]
    return f"{prefix}/{item.prompt_id}/{item.prompt_id}-{item.sample_index:04d}-{item.item_id[:8]}.{ext}"


def generation_metadata(item: Item) -> dict[str, object]:
    return {
        "item_id": item.item_id,
        "job": item.job,
        "prompt_id": item.prompt_id,
        "sample_index": item.sample_index,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt or "",
        "seed": item.seed,
        "model": item.model,
        "model_revision": item.model_revision,
        "lora": item.lora,
        "sampler": item.sampler,
        "steps": item.steps,
        "guidance_scale": item.guidance_scale,
        "width": item.width,
        "height": item.height,
    }


def encode_image(item: Item, quality: int = 95) -> bytes:
    """Encode ``item.pixels`` in the item's format with the generation metadata embedded."""
    img = Image.fromarray(item.pixels, mode="RGB")
    meta = generation_metadata(item)
    buf = io.BytesIO()
    if item.format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in meta.items():
            text = value if isinstance(value, str) else json.dumps(value)
            info.add_itxt(key, "" if text is None else text)
        info.add_itxt("genpipe", json.dumps(meta, sort_keys=True))
        img.save(buf, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = json.dumps(meta, sort_keys=True)
        kind = "JPEG" if item.format == "jpeg" else "WEBP"
        img.save(buf, format=kind, quality=quality, exif=exif)
    return buf.getvalue()


def read_embedded_metadata(data: bytes) -> dict[str, object]:
    """The generation metadata embedded by ``encode_image``."""
    img = Image.open(io.BytesIO(data))
    if img.format == "PNG":
        return json.loads(img.text["genpipe"])
    return json.loads(img.getexif()[_EXIF_IMAGE_DESCRIPTION])


class ImageWriter(Stage):
    """Writes each pending item's pixels under the job root and marks it ``generated``."""

    name = "write"

    def __init__(self, job_root: str, quality: int = 95, resources: Resources | None = None) -> None:
        self.job_root = job_root
        self.quality = quality
        self.resources = resources or Resources(num_cpus=0.25, stateful=False)
        self._storage: Storage | None = None

    def setup(self) -> None:
        self._storage = Storage(self.job_root)

    def process(self, items: list[Item]) -> list[Item]:
        if self._storage is None:
            self.setup()
        todo = [it for it in items if it.status == "pending"]
        # Encoding a 1024² PNG takes ~0.2 s of CPU (Pillow releases the GIL while it compresses): on a machine
        # with cores to spare, a batch's images are encoded side by side, so the last batch of a job does not
        # wait for them one by one. On a small machine (under 8 cores) they stay one at a time.
        workers = min(len(todo), _ENCODE_THREADS)
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="genpipe-encode") as pool:
                list(pool.map(self._write, todo))
        else:
            for item in todo:
                self._write(item)
        return items

    def _write(self, item: Item) -> None:
        if item.pixels is None:
            item.fail(RuntimeError("no pixels reached the writer"), self.name)
            return
        start = time.perf_counter()
        try:
            data = encode_image(item, self.quality)
            key = image_key(item)
            item.image_uri = self._storage.write_atomic(key, data)
            item.image_sha256 = hashlib.sha256(data).hexdigest()
            item.status = "generated"
        except Exception as exc:  # recorded on the item; the batch goes on
            item.fail(exc, self.name)
        finally:
            item.pixels = None
            item.timings["write_s"] = round(time.perf_counter() - start, 6)
