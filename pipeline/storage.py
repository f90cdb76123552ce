"""All storage goes through here: one fsspec helper for local paths, file://, memory://, s3://, gs://.

``Storage`` is rooted at a URL; keys are relative, '/'-separated, and can never leave the root. Writes are
atomic: an object appears under its final key complete or not at all (object stores publish a PUT whole;
on filesystems we write a temporary sibling and rename it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")

TMP_PREFIX = ".tmp-"
_ATOMIC_RENAME_PROTOCOLS = {"file", "local", "memory"}


class StorageError(RuntimeError):
    """A storage problem that retrying will not fix (bad URL, unsafe key, missing object)."""


def local_path(url: str) -> str | None:
    """The absolute local path for a local URL or plain path, else None."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        return None
    return os.path.abspath(os.path.expanduser(url))


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, tuple | list) else proto


def retry(fn: Callable[[], T], *, tries: int = 4, base_delay: float = 0.2, what: str = "storage call") -> T:
    """Retry ``fn`` on transient errors (OSError, timeouts, throttling) with exponential backoff."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except (OSError, TimeoutError, ConnectionError):
            if attempt == tries:
                raise
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class Storage:
    """A root URL and safe, atomic operations under it."""

    def __init__(self, root: str, **storage_options) -> None:
        lp = local_path(root)
        if lp is not None:
            root = lp
        self.fs, path = url_to_fs(root, **storage_options)
        self.protocol = _protocol(self.fs)
        self.root = path.rstrip("/") or "/"
        self.root_url = root.rstrip("/")

    # --- keys ----------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key``; refuses keys that are absolute or climb out of the root."""
        if not key or key.startswith("/") or "\\" in key or "\x00" in key:
            raise StorageError(f"unsafe storage key {key!r}")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"unsafe storage key {key!r}")
        full = posixpath.join(self.root, key)
        if not full.startswith(self.root.rstrip("/") + "/"):
            raise StorageError(f"storage key {key!r} leaves the root")
        return full

    def url(self, key: str) -> str:
        """The URL a reader would use for ``key``."""
        p = self.path(key)
        if self.protocol in ("file", "local"):
            return p
        return self.fs.unstrip_protocol(p)

    # --- operations ----------------------------------------------------------------------------
    def write_atomic(self, key: str, data: bytes) -> str:
        """Write ``data`` under ``key`` so that no partial object is ever visible there. Returns the URL."""
        final = self.path(key)
        parent = posixpath.dirname(final)

        def _write() -> None:
            if self.protocol in _ATOMIC_RENAME_PROTOCOLS:
                self.fs.makedirs(parent, exist_ok=True)
                tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
                try:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, final)
                finally:
                    if self.fs.exists(tmp):
                        self.fs.rm(tmp)
            else:
                self.fs.pipe_file(final, data)

        retry(_write, what=f"write {key}")
        return self.url(key)

    @contextlib.contextmanager
    def open_atomic(self, key: str) -> Iterator[BinaryIO]:
        """A writable file object whose content appears under ``key`` only once the block exits cleanly."""
        final = self.path(key)
        parent = posixpath.dirname(final)
        if self.protocol not in _ATOMIC_RENAME_PROTOCOLS:
            # An object store publishes a file object on close, also when the block raised (fsspec's __exit__ only
            # closes): the content goes to a local temporary file first and is uploaded in one put once the block
            # has succeeded; an object appears whole or not at all, and the upload is retried like any write.
            with tempfile.TemporaryFile(prefix="genpipe-") as local:
                yield local  # type: ignore[misc]
                local.seek(0)
                data = local.read()
            retry(lambda: self.fs.pipe_file(final, data), what=f"write {key}")
            return
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def read(self, key: str) -> bytes:
        return retry(lambda: self.fs.cat_file(self.path(key)), what=f"read {key}")

    def exists(self, key: str) -> bool:
        return retry(lambda: self.fs.exists(self.path(key)), what=f"exists {key}")

    def sha256(self, key: str) -> str | None:
        """sha256 of the object under ``key``, or None when it does not exist."""
        try:
            return hashlib.sha256(self.read(key)).hexdigest()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        p = self.path(key)
        if self.fs.exists(p):
            retry(lambda: self.fs.rm(p, recursive=True), what=f"delete {key}")

    def move(self, src: str, dst: str) -> None:
        """Move an object to another key under the same root (used to quarantine orphans)."""
        source, target = self.path(src), self.path(dst)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        retry(lambda: self.fs.mv(source, target), what=f"move {src}")

    def walk(self, prefix: str = "") -> Iterator[str]:
        """Every object key under ``prefix`` (relative to the root)."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return
        for p in sorted(self.fs.find(base)):
            yield posixpath.relpath(p, self.root)


def open_input(url: str, mode: str = "rb"):
    """Open a single input object (a manifest, a spec) by URL or path."""
    lp = local_path(url)
    return fsspec.open(lp if lp is not None else url, mode)
