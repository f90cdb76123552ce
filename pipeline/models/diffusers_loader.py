"""Loading diffusers text-to-image pipelines and their LoRA adapters: safetensors only, never a surprise download.

``check_model`` runs on the driver before anything launches; ``load_pipeline`` runs once per generator actor.
Hub access follows the environment: with ``HF_HUB_OFFLINE=1`` (tests, air-gapped clusters) an HF id must already
be in the local HF cache, and a missing one is a ``ModelError`` naming it, not a stack of hub exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import GenpipeError
from schemas.spec import LoraSpec, ModelSpec

_PICKLE_WEIGHTS = (".bin", ".pt", ".ckpt", ".pth")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@functools.cache
def _dtype_kwarg() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); use what this one reads.
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


class ModelError(GenpipeError, ValueError):
    """The model or an adapter cannot be used: missing, broken, not a diffusers pipeline, or not safetensors. A
    ``GenpipeError``, so the CLI prints it as one line wherever it is raised (also in a stage's ``setup()``)."""


def is_local(model_id: str) -> bool:
    """Local directory (or meant to be one) rather than an HF hub id."""
    if model_id.startswith(("/", "./", "../", "~", "file://")) or Path(model_id).expanduser().exists():
        return True
    return not _HF_ID_RE.fullmatch(model_id)


def resolve_model(model: ModelSpec) -> str:
    """The path or HF id ``from_pretrained`` gets: the tiny model's cache path, an absolute local path, or the id."""
    from pipeline.models.tiny import TINY_MODEL_ID, ensure_tiny

    if model.id == TINY_MODEL_ID:
        return str(ensure_tiny()["sd"])
    if is_local(model.id):
        return str(Path(model.id.removeprefix("file://")).expanduser().resolve())
    return model.id


def check_model(model: ModelSpec) -> str:
    """Fail fast with a ``ModelError`` naming the problem; returns what ``resolve_model`` returns."""
    if "://" in model.id and not model.id.startswith("file://"):
        raise ModelError(f"{model.id!r}: models load from a local directory or an HF id, not a URL")
    resolved = resolve_model(model)
    directory = Path(resolved) if is_local(resolved) else _cached_snapshot(model)
    if directory is not None:
        _check_directory(directory, shown=model.id)
    for lora in model.lora:
        check_lora(lora)
    return resolved


def _cached_snapshot(model: ModelSpec) -> Path | None:
    """The local snapshot of an HF id when the hub is off limits; None when downloads are allowed."""
    from huggingface_hub import constants, snapshot_download

    if not constants.is_offline_mode():
        return None  # from_pretrained will download it, safetensors only
    try:
        return Path(snapshot_download(model.id, revision=model.revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, bad revision...
        rev = f" at revision {model.revision!r}" if model.revision else ""
        raise ModelError(
            f"{model.id!r}{rev} is not a local directory and is not in the local HF cache, and HF_HUB_OFFLINE is set "
            f"so it cannot be downloaded; download it beforehand or give a local path ({type(exc).__name__})"
        ) from None


def _check_directory(directory: Path, shown: str) -> None:
    if not directory.exists():
        raise ModelError(f"{shown!r}: model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ModelError(f"{shown!r}: {str(directory)!r} is a file; give a diffusers pipeline directory")
    if not (directory / "model_index.json").is_file():
        raise ModelError(
            f"{shown!r}: {str(directory)!r} has no model_index.json, so it is not a diffusers pipeline directory "
            "(single-file checkpoints are not supported; convert them with diffusers' save_pretrained)"
        )
    components = [directory] + sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    for comp in components:
        files = list(comp.glob("*")) if comp == directory else list(comp.rglob("*"))
        pickled = sorted(f.name for f in files if f.suffix in _PICKLE_WEIGHTS)
        has_safetensors = any(f.suffix == ".safetensors" for f in files)
        if pickled and not has_safetensors:
            where = "the top level" if comp == directory else f"component {comp.name!r}"
            raise ModelError(
                f"{shown!r}: {where} has only pickle weights ({', '.join(pickled[:5])}); weights load as "
                "safetensors only — convert them (e.g. save_pretrained(..., safe_serialization=True))"
            )


def check_lora(lora: LoraSpec | dict[str, Any]) -> None:
    """A local adapter must exist and be safetensors (remote URLs are checked when fetched)."""
    lora = _as_spec(lora)
    path = lora.path
    if "://" in path and not path.startswith("file://"):
        return
    p = Path(path.removeprefix("file://")).expanduser()
    if not p.exists():
        raise ModelError(f"LoRA adapter {path!r} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ModelError(f"LoRA adapter {path!r} is not a .safetensors file")
        return
    if lora.weight_name is not None:
        if not lora.weight_name.endswith(".safetensors"):
            raise ModelError(f"LoRA adapter {path!r}: weight_name {lora.weight_name!r} is not a .safetensors file")
        if not (p / lora.weight_name).is_file():
            raise ModelError(f"LoRA adapter {path!r} has no file {lora.weight_name!r}")
    elif not any(p.glob("*.safetensors")):
        raise ModelError(f"LoRA adapter directory {path!r} has no .safetensors file")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No loading progress bars or info chatter from diffusers / transformers (genpipe prints one progress line of
    its own, and a load error one line naming the model); restored after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load_pipeline(model: ModelSpec, device: str):
    """The pipeline on ``device`` with the spec's LoRA adapters loaded (inactive until ``set_adapters``)."""
    import torch
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    path = check_model(model)
    kwargs = {"revision": model.revision, _dtype_kwarg(): getattr(torch, model.dtype), "use_safetensors": True}
    try:
        with quiet_loading():
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(path, **kwargs)
            except ValueError as exc:
                if "AutoPipeline can't find a pipeline" not in str(exc):
                    raise
                # A text-to-image pipeline AutoPipeline has no mapping for (community or new classes).
                pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except Exception as exc:  # hub errors are OSErrors; a truncated file or a config that does not fit the weights
        # raise whatever diffusers, safetensors or torch raise: each is a broken model, named on one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{model.id!r}: cannot load the pipeline: {type(exc).__name__}: {first}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for lora in model.lora:
        load_lora(pipe, lora)
    if model.lora:
        pipe.disable_lora()
    return pipe


def lora_adapter_name(lora: LoraSpec | dict[str, Any]) -> str:
    """A stable adapter name per (path, weight_name), so the same adapter is loaded once whatever its scale."""
    lora = _as_spec(lora)
    key = f"{lora.path}\0{lora.weight_name or ''}"
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_lora(pipe, lora: LoraSpec | dict[str, Any]) -> str:
    """Load an adapter into ``pipe`` unless it is there already; returns its adapter name."""
    lora = _as_spec(lora)
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"{type(pipe).__name__} does not support LoRA adapters")
    name = lora_adapter_name(lora)
    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    if name in loaded:
        return name
    check_lora(lora)
    source = _fetch_lora(lora.path)
    kwargs: dict[str, Any] = {"adapter_name": name, "use_safetensors": True}
    if lora.weight_name is not None:
        kwargs["weight_name"] = lora.weight_name
    try:
        with warnings.catch_warnings():
            # peft warns whenever a second adapter joins a model; several adapters side by side is the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"LoRA adapter {lora.path!r} cannot be loaded: {exc}") from exc
    return name


def _fetch_lora(path: str) -> str:
    """A local path for the adapter; a remote (fsspec) adapter is copied into the genpipe cache once per version: the
    cache key holds the remote files' listing (size, ETag, modification time: whatever the filesystem reports), so
    an adapter replaced at the same URL is fetched again."""
    if "://" not in path or path.startswith("file://"):
        return str(Path(path.removeprefix("file://")).expanduser())
    import fsspec

    from pipeline.models.tiny import cache_root

    fs, remote = fsspec.core.url_to_fs(path)
    try:
        listing = fs.find(remote, detail=True) if fs.isdir(remote) else {remote: fs.info(remote)}
    except OSError as exc:
        raise ModelError(f"LoRA adapter {path!r} cannot be read: {exc}") from exc
    version = json.dumps(sorted(listing.items()), sort_keys=True, default=str)
    target = cache_root() / "lora" / hashlib.sha256(f"{path}\0{version}".encode()).hexdigest()[:16]
    if not target.exists():
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        else:
            tmp.mkdir(parents=True)
            fs.get(remote, str(tmp / Path(remote).name))
        try:
            os.rename(tmp, target)
        except OSError:  # another actor fetched it first
            shutil.rmtree(tmp, ignore_errors=True)
    if not any(target.rglob("*.safetensors")):
        raise ModelError(f"LoRA adapter {path!r} has no .safetensors file")
    files = list(target.iterdir())
    # A single fetched file: hand diffusers the file itself, as for a local file path.
    return str(files[0]) if len(files) == 1 and files[0].is_file() else str(target)


#: What a model directory's fingerprint covers: the weights and every file that configures them (component and
#: scheduler configs, tokenizer vocabularies). Pickle duplicates of the weights are never loaded, so not hashed.
_FINGERPRINTED = (".safetensors", ".json", ".txt", ".model")


def model_directory(model: ModelSpec) -> Path | None:
    """The directory ``from_pretrained`` reads: a local one, or an HF id's snapshot in the local cache (None when
    the hub may be used and the id is not a local directory)."""
    resolved = resolve_model(model)
    return Path(resolved) if is_local(resolved) else _cached_snapshot(model)


def model_fingerprint(path: str | Path, cache: Path | None = None) -> dict[str, str]:
    """sha256 of the weights and configuration files under a model directory (``_FINGERPRINTED``), by relative
    path, hidden folders left out (for the audit log, and to notice a model changed under the same name).

    Hashing SDXL's ~7 GB takes 8–24 s, on every run, before planning; so a digest is kept in ``cache`` (default
    ``{cache_root}/fingerprints.json``) under the file's absolute path and reused while the file's device, inode,
    size, mtime and ctime are all unchanged. ctime cannot be set from user space, so rewriting a file, even
    with its old size and mtime restored, makes it hash again. ``GENPIPE_FINGERPRINT_CACHE=0`` always hashes."""
    root = Path(path)
    use_cache = os.environ.get("GENPIPE_FINGERPRINT_CACHE", "1") != "0"
    if cache is None:
        from pipeline.models.tiny import cache_root

        cache = cache_root() / "fingerprints.json"
    known = _read_fingerprints(cache) if use_cache else {}
    out, fresh = {}, {}
    files = (f for f in root.rglob("*") if f.suffix in _FINGERPRINTED and f.is_file())
    for f in sorted(f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)):
        st = f.stat()
        stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = known.get(str(f.resolve()))
        if entry and entry.get("stat") == stamp:
            digest = entry["sha256"]
        else:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
            fresh[str(f.resolve())] = {"stat": stamp, "sha256": digest}
        out[f.relative_to(root).as_posix()] = digest
    if use_cache and fresh:
        _write_fingerprints(cache, {**known, **fresh})
    return out


def _read_fingerprints(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # missing or unreadable: hash everything (and rewrite it)
    return data if isinstance(data, dict) else {}


def _write_fingerprints(cache: Path, data: dict[str, Any]) -> None:
    try:  # atomic, so concurrent jobs never read half a file; last writer wins, both are correct
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the hashing time


def _as_spec(lora: LoraSpec | dict[str, Any]) -> LoraSpec:
    return lora if isinstance(lora, LoraSpec) else LoraSpec(**lora)
