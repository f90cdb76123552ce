"""Storage keys stay inside the root, writes are atomic; the writer embeds metadata and records the sha256."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.stages.write import ImageWriter, image_key, read_embedded_metadata
from pipeline.storage import Storage, StorageError
from schemas.record import Item, items_from_table, items_to_table


def _item(fmt: str = "png", **kw) -> Item:
    rng = np.random.default_rng(0)
    base = dict(item_id="0123456789abcdef" * 2, job="j", prompt_id="sku-1", sample_index=3, row_number=1,
                prompt="a mug", negative_prompt="blurry", seed=7, model="tiny", sampler="euler", steps=4,
                guidance_scale=5.0, width=16, height=8, format=fmt)  # fmt: skip
    base.update(kw)
    item = Item(**base)
    item.pixels = rng.integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    return item


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "", "a/./b", "a\\b", "x\x00"])
def test_unsafe_keys_are_refused(tmp_path, key):
    with pytest.raises(StorageError):
        Storage(str(tmp_path)).path(key)


@pytest.mark.parametrize("root", ["local", "memory://genpipe-test-atomic"])
def test_atomic_write_leaves_only_the_final_object(tmp_path, root):
    st = Storage(str(tmp_path) if root == "local" else root)
    st.write_atomic("a/b/c.bin", b"hello")
    assert st.read("a/b/c.bin") == b"hello"
    assert list(st.walk()) == ["a/b/c.bin"]
    assert st.sha256("a/b/c.bin") == hashlib.sha256(b"hello").hexdigest()
    assert st.sha256("missing") is None
    with st.open_atomic("r.parquet") as f:
        f.write(b"x")
        assert not st.exists("r.parquet")  # not visible before the block exits
    assert st.read("r.parquet") == b"x"
    with pytest.raises(RuntimeError), st.open_atomic("broken.bin") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert sorted(st.walk()) == ["a/b/c.bin", "r.parquet"]
    st.delete("a")
    assert list(st.walk()) == ["r.parquet"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_writer_stores_image_with_metadata_and_sha(tmp_path, fmt):
    writer = ImageWriter(str(tmp_path / "job"))
    writer.setup()
    item = _item(fmt)
    pixels = item.pixels.copy()
    [out] = writer.process([item])
    assert out.status == "generated" and out.pixels is None
    key = image_key(out)
    assert key == f"images/sku-1/sku-1-0003-01234567.{ {'png': 'png', 'jpeg': 'jpg', 'webp': 'webp'}[fmt] }"
    data = (tmp_path / "job" / key).read_bytes()
    assert hashlib.sha256(data).hexdigest() == out.image_sha256
    assert out.image_uri == str(tmp_path / "job" / key)
    meta = read_embedded_metadata(data)
    assert meta["prompt"] == "a mug" and meta["seed"] == 7 and meta["item_id"] == out.item_id
    assert meta["negative_prompt"] == "blurry" and meta["sampler"] == "euler" and meta["guidance_scale"] == 5.0
    img = Image.open(io.BytesIO(data))
    assert img.size == (16, 8) and img.mode == "RGB"
    if fmt == "png":  # lossless
        assert np.array_equal(np.asarray(img), pixels)
        assert img.text["prompt"] == "a mug" and img.text["seed"] == "7"


def test_writer_passes_non_pending_through_and_fails_items_without_pixels(tmp_path):
    writer = ImageWriter(str(tmp_path))
    rejected = _item(status="rejected")
    missing = _item()
    missing.pixels = None
    out = writer.process([rejected, missing])
    assert out[0].status == "rejected" and out[0].image_uri is None
    assert out[1].status == "failed" and "no pixels" in out[1].error
    assert list(Storage(str(tmp_path)).walk()) == []


def test_record_round_trips_through_arrow_transport():
    item = _item(lora=[{"path": "/x", "scale": 0.5}], tags=["a"], metadata={"k": [1, 2]}, scores={"s": 0.1})
    [back] = items_from_table(items_to_table([item]))
    assert back.as_dict() == item.as_dict()
    assert np.array_equal(back.pixels, item.pixels)


def test_a_batch_encoded_side_by_side_stores_the_same_bytes_as_one_at_a_time(tmp_path, monkeypatch):
    import pipeline.stages.write as write

    def batch():
        rng = np.random.default_rng(0)
        items = [_item(seed=s, item_id=f"{s:032x}") for s in range(6)]
        for it in items:
            it.pixels = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
        return items

    monkeypatch.setattr(write, "_ENCODE_THREADS", 1)
    serial = ImageWriter(str(tmp_path / "a")).process(batch())
    monkeypatch.setattr(write, "_ENCODE_THREADS", 4)
    threaded = ImageWriter(str(tmp_path / "b")).process(batch())
    assert [it.status for it in threaded] == ["generated"] * 6
    assert [it.image_sha256 for it in threaded] == [it.image_sha256 for it in serial]
