"""Where a manifest row may load LoRA adapters from: the spec's own adapters and ``model.row_lora_sources``.

The spec is what the platform team approved; a manifest row is data a campaign team writes. Without this
check a row's ``lora`` would make every generator actor read any file, or fetch any URL, the cluster can reach
with the job's credentials: another team's bucket, an internal HTTP endpoint. The planner asks ``problem`` for
each row adapter and rejects the row, naming the adapter, when it lies outside the allowed places.

Local paths are compared after resolving symlinks and ``..`` (a link inside an allowed folder that points out of
it is outside). URLs are compared as written, segment by segment; a URL with a ``.`` or ``..`` segment, an
escaped dot, slash or backslash, a query or a fragment is never allowed, since a store or server may resolve
it elsewhere than it reads.
"""

from __future__ import annotations

import functools
import os
import re

from schemas.spec import ModelSpec

_TRICKY_URL = re.compile(r"%2e|%2f|%5c|\\|[?#]", re.IGNORECASE)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    return _SCHEME.match(path) is not None and not path.startswith("file://")


@functools.lru_cache(maxsize=4096)
def normal_location(path: str) -> str | None:
    """The place ``path`` names, comparable by prefix; None for a path that could name a place other than it reads:
    an fsspec chain (``a::memory://``: the outer filesystem reads ``a``, whatever the prefix looked like), a
    ``://`` that does not start a URL, and URLs with dot segments, escapes, queries or fragments."""
    if "::" in path or ("://" in path and _SCHEME.match(path) is None):
        return None
    if is_url(path):
        protocol, _, rest = path.partition("://")
        segments = rest.split("/")
        if _TRICKY_URL.search(rest) or any(s in (".", "..") for s in segments):
            return None
        return f"{protocol.lower()}://{rest}"
    return os.path.realpath(os.path.expanduser(path.removeprefix("file://")))


def _within(where: str, root: str) -> bool:
    return where == root or where.startswith(root.rstrip("/") + "/")


class LoraSources:
    """The places a job's manifest rows may load adapters from."""

    def __init__(self, model: ModelSpec) -> None:
        self._own = {normal_location(lo.path) for lo in model.lora} - {None}
        self._roots = tuple(r for r in (normal_location(s) for s in model.row_lora_sources) if r is not None)
        self._shown = ", ".join(repr(s) for s in model.row_lora_sources) or "none"

    def problem(self, path: str) -> str | None:
        """Why a row may not use the adapter at ``path``, or None when it may."""
        where = normal_location(path)
        if where is None:
            return (f"adapter {path!r}: a '::' chain, or a URL with '.' or '..' segments, escapes, a query or a "
                    "fragment, is not allowed")  # fmt: skip
        if where in self._own or any(_within(where, root) for root in self._roots):
            return None
        return (f"adapter {path!r} is neither one of the spec's adapters (model.lora) nor under "
                f"model.row_lora_sources ({self._shown})")  # fmt: skip
