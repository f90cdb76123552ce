"""How planned shards reach the executors: ``_PlanningThread.waves`` hands out every key written so far; for Ray
(``grow``) each wave waits until it is as big as all the waves before it, so actor restarts stay ~log2(shards)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from pipeline.runner import _KnownShards, _PlanningThread


def _feed() -> _PlanningThread:
    # Not started: the test plays the planner by putting keys (None: planning ended) on its queue.
    return _PlanningThread(SimpleNamespace(stop=threading.Event(), on_shard=None))


def _next_in_thread(waves) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(next(waves)), daemon=True)
    thread.start()
    return thread, got


def test_waves_hand_out_what_is_written_and_wait_only_for_a_first_key():
    feed = _feed()
    for key in ("a", "b"):
        feed._keys.put(key)
    assert feed.has_work()
    waves = feed.waves()
    assert next(waves) == ["a", "b"]
    thread, got = _next_in_thread(waves)
    thread.join(0.2)
    assert thread.is_alive()  # nothing written since: it waits
    feed._keys.put("c")
    thread.join(5)
    assert got == [["c"]]
    feed._keys.put("d")
    feed._keys.put(None)
    assert list(waves) == [["d"]]


def test_growing_waves_wait_until_they_match_all_the_work_before_them():
    feed = _feed()
    feed._keys.put("k1")
    waves = feed.waves(grow=True)
    assert next(waves) == ["k1"]
    feed._keys.put("k2")
    assert next(waves) == ["k2"]  # 1 key before it: one is enough
    feed._keys.put("k3")
    thread, got = _next_in_thread(waves)
    thread.join(0.2)
    assert thread.is_alive()  # 2 keys before it: k3 alone waits for a second
    feed._keys.put("k4")
    thread.join(5)
    assert got == [["k3", "k4"]]
    for key in ("k5", "k6", "k7", None):  # planning ends before 4 more: the rest goes at once
        feed._keys.put(key)
    assert list(waves) == [["k5", "k6", "k7"]]


def test_the_planners_error_comes_after_the_waves_before_it():
    feed = _feed()
    feed._keys.put("a")
    feed._failure = OSError("plan storage is full")
    feed._keys.put(None)
    waves = feed.waves(grow=True)
    assert next(waves) == ["a"]
    with pytest.raises(OSError, match="plan storage is full"):
        next(waves)


def test_no_shard_at_all_is_no_work_and_still_raises_the_planners_error():
    feed = _feed()
    feed._failure = ValueError("manifest: no such file")
    feed._keys.put(None)
    assert not feed.has_work()
    with pytest.raises(ValueError, match="no such file"):
        list(feed.waves())
    assert not _KnownShards([]).has_work() and list(_KnownShards([]).waves()) == []
    assert list(_KnownShards(["x", "y"]).waves(grow=True)) == [["x", "y"]]


@pytest.mark.parametrize(("grace_s", "waves"), [(5.0, [["a", "b"]]), (0.0, [["a"], ["b"]])])
def test_ray_gives_a_nearly_finished_plan_a_grace_period_instead_of_a_second_wave(monkeypatch, grace_s, waves):
    from pipeline import runner
    from pipeline.executors import ray_data

    calls: list[list[str]] = []
    monkeypatch.setattr(ray_data, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(runner, "_precheck_cluster", lambda spec: None)
    monkeypatch.setattr(runner, "shard_batches", lambda storage, key: 1)
    monkeypatch.setattr(ray_data, "run_ray", lambda stages, batches, *a: calls.append([k for k, _ in batches]))
    monkeypatch.setattr(runner, "RAY_PLAN_GRACE_S", grace_s)
    feed = _feed()
    feed._keys.put("a")

    def planner_finishes():  # the last shard, 0.3 s after Ray is up
        time.sleep(0.3)
        feed._keys.put("b")
        feed._keys.put(None)
        feed._planned.set()

    threading.Thread(target=planner_finishes, daemon=True).start()
    spec = SimpleNamespace(executor="ray", resources=SimpleNamespace(batch_size=2))
    runner._execute(spec, [], None, feed, sink=lambda items: None)
    assert calls == waves


def test_after_the_end_nothing_waits():
    feed = _feed()
    feed._keys.put("a")
    feed._keys.put(None)
    assert list(feed.waves()) == [["a"]]
    assert not feed.has_work() and list(feed.waves()) == []  # the end marker is gone: it must not block
