"""What both executors share: running one stage on a batch so that a stage error fails items, not the job, and
handing the sink finished batches coalesced while it was busy."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.stages.base import Stage
from schemas.record import Item

SINK_MAX_ITEMS = 512  # records per audit transaction at most, when the sink has fallen behind
READ_AHEAD = 64  # finished batches waiting for the sink at most


def run_stage(stage: Stage, items: list[Item]) -> list[Item]:
    """``stage.process`` with a safety net: if the stage raises for the whole batch, its pending items are
    recorded as failed (with the exception) and the batch goes on to the next stage and the sink."""
    try:
        out = stage.process(items)
    except Exception as exc:
        for item in items:
            if item.status == "pending":
                item.fail(exc, stage.name)
        return items
    if len(out) != len(items):
        # Stages route and flag; they never drop. A stage that loses items is a bug worth stopping for.
        raise RuntimeError(f"stage {stage.name!r} returned {len(out)} items for {len(items)}")
    return out


def run_stages(stages: list[Stage], items: list[Item]) -> list[Item]:
    for stage in stages:
        items = run_stage(stage, items)
    return items


def coalesced(batches: Iterable[list[Item]], max_items: int) -> Iterator[list[Item]]:
    """``batches`` read ahead in a thread; each step yields every batch already waiting (at least one; at most
    ``max_items`` items unless one batch is bigger), in order. The sink then writes what piled up while it was
    busy in one transaction, and never waits for a batch that has not arrived. An error of ``batches`` is
    raised after the batches before it."""
    waiting: queue.Queue = queue.Queue(READ_AHEAD)  # bounded: a slow sink holds the stages back
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                waiting.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as exc:
            put(("error", exc))

    reader = threading.Thread(target=read, name="genpipe-results", daemon=True)
    reader.start()
    try:
        kind, value = waiting.get()
        while True:
            out: list[Item] = []
            while kind == "batch" and (not out or len(out) + len(value) <= max_items):
                out.extend(value)
                try:
                    kind, value = waiting.get_nowait()
                except queue.Empty:
                    kind, value = "wait", None
            if out:
                yield out
            if kind == "error":
                raise value
            if kind == "end":
                return
            if kind == "wait":
                kind, value = waiting.get()
    finally:
        stop.set()
        # The reader ends at its next step; it may be waiting inside ``batches`` (a Ray iterator) for a while.
        reader.join(timeout=1.0)
