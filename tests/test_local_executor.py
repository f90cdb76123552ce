"""The in-process executor's pipeline of threads: order, overlap, coalesced sink writes, errors and stopping."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.executors import local
from pipeline.executors.local import run_local
from pipeline.stages.base import Stage
from schemas.record import Item


def _items(n: int, batch: int) -> list[list[Item]]:
    items = [
        Item(item_id=f"id-{i:03d}", job="j", prompt_id=f"p{i}", sample_index=0, row_number=i, prompt=f"p {i}")
        for i in range(n)
    ]
    return [items[i : i + batch] for i in range(0, n, batch)]


class Tag(Stage):
    """Appends its name to every item's ``metadata["seen"]``; optionally sleeps, fails or records its thread."""

    def __init__(self, name: str, sleep_s: float = 0.0, fail_on: str | None = None) -> None:
        self.name, self.sleep_s, self.fail_on = name, sleep_s, fail_on
        self.setup_thread: str | None = None
        self.busy: list[tuple[float, float]] = []

    def setup(self) -> None:
        self.setup_thread = threading.current_thread().name

    def process(self, items: list[Item]) -> list[Item]:
        start = time.monotonic()
        if self.fail_on and any(it.item_id == self.fail_on for it in items):
            raise ValueError(f"{self.name} cannot handle {self.fail_on}")
        time.sleep(self.sleep_s)
        for it in items:
            it.metadata.setdefault("seen", []).append(self.name)
        self.busy.append((start, time.monotonic()))
        return items


class Dropper(Stage):
    name = "dropper"

    def process(self, items: list[Item]) -> list[Item]:
        return items[1:]  # a bug: stages never drop


@pytest.mark.parametrize("pipelined", [True, False])
def test_every_item_through_every_stage_in_order(pipelined):
    stages = [Tag("a"), Tag("b"), Tag("c")]
    out: list[Item] = []
    run_local(stages, _items(10, 3), out.extend, pipelined=pipelined)
    assert [it.item_id for it in out] == [f"id-{i:03d}" for i in range(10)]
    assert all(it.metadata["seen"] == ["a", "b", "c"] for it in out)
    assert all(it.status == "pending" for it in out)


def test_stages_set_up_in_their_own_threads_and_overlap():
    slow_a, slow_b = Tag("a", sleep_s=0.05), Tag("b", sleep_s=0.05)
    run_local([slow_a, slow_b], _items(12, 2), lambda items: None)
    assert slow_a.setup_thread == "genpipe-a" and slow_b.setup_thread == "genpipe-b"
    # b works on batch k while a works on batch k+1: some of their busy intervals intersect.
    overlaps = sum(1 for s1, e1 in slow_a.busy for s2, e2 in slow_b.busy if s1 < e2 and s2 < e1)
    assert overlaps >= 3


def test_a_slow_sink_gets_finished_batches_coalesced_in_order():
    calls: list[list[str]] = []

    def slow_sink(items):
        calls.append([it.item_id for it in items])
        time.sleep(0.1)

    run_local([Tag("a")], _items(24, 2), slow_sink)
    assert [i for call in calls for i in call] == [f"id-{i:03d}" for i in range(24)]
    assert len(calls) < 12 and max(len(c) for c in calls) > 2  # waited-for batches went in one call


def test_sink_writes_are_capped(monkeypatch):
    monkeypatch.setattr(local, "SINK_MAX_ITEMS", 4)
    monkeypatch.setattr(local, "QUEUE_DEPTH", 8)
    sizes: list[int] = []

    def slow_sink(items):
        sizes.append(len(items))
        time.sleep(0.05)

    run_local([Tag("a")], _items(40, 2), slow_sink)
    assert sum(sizes) == 40 and max(sizes) == 4


def test_a_stage_error_fails_that_batch_and_the_run_goes_on():
    out: list[Item] = []
    run_local([Tag("a", fail_on="id-004"), Tag("b")], _items(8, 2), out.extend)
    failed = [it.item_id for it in out if it.status == "failed"]
    assert failed == ["id-004", "id-005"] and len(out) == 8
    assert out[4].reasons[-1]["stage"] == "a" and "cannot handle id-004" in out[4].error


@pytest.mark.timeout(30)
def test_a_stage_that_drops_items_stops_the_run_with_its_error_after_the_batches_before_it():
    class DropsThird(Stage):
        name = "dropper"

        def process(self, items):
            return items[1:] if items[0].item_id == "id-004" else items

    out: list[Item] = []
    with pytest.raises(RuntimeError, match="stage 'dropper' returned 1 items for 2"):
        run_local([Tag("a", sleep_s=0.02), DropsThird(), Tag("c", sleep_s=0.05)], _items(12, 2), out.extend)
    assert [it.item_id for it in out] == ["id-000", "id-001", "id-002", "id-003"]  # finished and sunk
    assert all(it.metadata["seen"] == ["a", "c"] for it in out)


@pytest.mark.timeout(30)
def test_a_failing_setup_is_raised():
    class Broken(Tag):
        def setup(self):
            raise OSError("weights missing")

    with pytest.raises(OSError, match="weights missing"):
        run_local([Broken("a"), Tag("b")], _items(4, 2), lambda items: None)


@pytest.mark.timeout(30)
def test_a_sink_error_stops_every_thread_before_it_is_raised():
    gen = Tag("gen", sleep_s=0.02)
    before = threading.active_count()
    seen: list[int] = []

    def sink(items):
        seen.append(len(items))
        raise RuntimeError("database is gone")

    with pytest.raises(RuntimeError, match="database is gone"):
        run_local([gen, Tag("write")], _items(200, 2), sink)
    # No stage thread is left (they are joined); the reading source thread ends at its next step.
    assert not [t for t in threading.enumerate() if t.name in ("genpipe-gen", "genpipe-write")]
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
    # It stopped early: a few batches ran ahead into the queues, not the whole stream.
    assert len(gen.busy) < 20


@pytest.mark.timeout(30)
def test_a_failing_batch_source_is_raised():
    def batches():
        yield _items(2, 2)[0]
        raise ValueError("shard is corrupt")

    out: list[Item] = []
    with pytest.raises(ValueError, match="shard is corrupt"):
        run_local([Tag("a")], batches(), out.extend)
    assert [it.item_id for it in out] == ["id-000", "id-001"]


@pytest.mark.timeout(30)
def test_batches_before_a_source_error_are_all_finished_and_sunk():
    """The source fails while slow stages still hold earlier batches: every one of them reaches the sink."""
    batches = _items(24, 2)

    def source():
        yield from batches
        raise OSError("planner failed")

    out: list[Item] = []
    stages = [Tag("gen", sleep_s=0.05), Tag("score", sleep_s=0.05), Tag("write", sleep_s=0.05)]
    with pytest.raises(OSError, match="planner failed"):
        run_local(stages, source(), out.extend)
    assert [it.item_id for it in out] == [f"id-{i:03d}" for i in range(24)]


@pytest.mark.timeout(30)
def test_a_failing_setup_downstream_skips_the_stages_after_it():
    class Broken(Tag):
        def setup(self):
            raise OSError("scorer weights missing")

    after = Tag("write")
    with pytest.raises(OSError, match="scorer weights missing"):
        run_local([Tag("gen"), Broken("score"), after], _items(6, 2), lambda items: None)
    assert after.setup_thread is None and after.busy == []  # nothing reached the writer


def test_no_batches_means_no_stage_is_set_up():
    a = Tag("a")
    out: list[Item] = []
    run_local([a], iter(()), out.extend)
    assert out == [] and a.setup_thread is None


def test_coalesced_results_keep_order_merge_what_waits_and_raise_at_the_end():
    from pipeline.executors.common import coalesced

    batches = _items(20, 2)

    def source():
        yield from batches[:8]
        raise ConnectionError("cluster went away")

    seen: list[list[str]] = []
    with pytest.raises(ConnectionError, match="cluster went away"):
        for items in coalesced(source(), max_items=6):
            seen.append([it.item_id for it in items])
            time.sleep(0.05)  # a slow sink: the source runs ahead and batches pile up
    assert [i for call in seen for i in call] == [f"id-{i:03d}" for i in range(16)]
    assert max(len(c) for c in seen) == 6 and len(seen) < 8
