"""The in-process executor: the stage list as a pipeline of threads, one per stage, with the sink in the caller.

Each stage sets itself up and then takes batches, in order, from a small queue fed by the stage before it, so
while the generator works on batch k+1 the scorer scores batch k and the writer encodes batch k-1 (torch,
onnxruntime and PNG encoding release the GIL). Order is kept end to end: the sink sees batches in plan order.
The sink (the audit write) gets, in one call, every finished batch that is already waiting — up to
``SINK_MAX_ITEMS`` records — so a slow database catches up in bigger transactions without ever holding a
record back. ``pipelined=False`` runs the same stages one batch at a time in the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from pipeline.executors.common import SINK_MAX_ITEMS, run_stage, run_stages
from pipeline.stages.base import Stage
from schemas.record import Item

QUEUE_DEPTH = 2  # batches waiting between two stages: enough to keep both busy, few enough to bound memory
_POLL_S = 0.1  # how often a blocked thread looks whether the run was stopped
_DONE = object()  # end of the stream


def run_local(
    stages: list[Stage],
    batches: Iterable[list[Item]],
    sink: Callable[[list[Item]], None],
    *,
    pipelined: bool = True,
) -> None:
    if not pipelined:
        for stage in stages:
            stage.setup()
        for items in batches:
            sink(run_stages(stages, items))
        return
    with _Pipeline(stages, batches) as pipe:
        for items in pipe.results():
            sink(items)


class _Failure:
    """An error, travelling down the queues behind the batches that came before it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pipeline:
    """Threads and queues: source → stage 1 → … → stage n → ``results()``.

    An error of the source or of a stage travels down the queues behind the batches before it, so those are
    still finished and sunk (their images may already be written: they get their records), then it is raised
    in the caller; the source stops feeding and the stages upstream of the failure drop what they hold (no image
    of theirs was written yet). Leaving the ``with`` block (normally, or because the sink raised) stops every
    thread and waits for the stage threads, so nothing is still writing images once ``run_local`` has returned.
    """

    def __init__(self, stages: list[Stage], batches: Iterable[list[Item]]) -> None:
        self._stop = threading.Event()  # the caller has gone: every thread ends at once
        self._halt = threading.Event()  # a stage failed: the source stops feeding
        self._started = threading.Event()  # set at the first batch, or at the end of an empty stream
        self._empty = True
        self._ready = [threading.Event() for _ in stages]  # stage i has set up (or failed to)
        self._setup_failed = False
        self._queues = [queue.Queue(QUEUE_DEPTH) for _ in range(len(stages) + 1)]
        self._threads = [threading.Thread(target=self._feed, args=(iter(batches),), name="genpipe-source", daemon=True)]
        for i, stage in enumerate(stages):
            self._threads.append(
                threading.Thread(target=self._work, args=(stage, i), name=f"genpipe-{stage.name}", daemon=True)
            )

    def __enter__(self) -> _Pipeline:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        # The stage threads are waited for: none may still be writing once we return. The source thread only
        # reads, and may be blocked inside ``batches`` (waiting for the planner's next shard): it gets a moment,
        # else it ends by itself at its next step, once its owner has stopped the planner.
        for t in self._threads[1:]:
            t.join()
        self._threads[0].join(timeout=3 * _POLL_S)

    def results(self) -> Iterator[list[Item]]:
        """Finished batches in order, each step with every batch already waiting (up to ``SINK_MAX_ITEMS``
        items): never waits for more. An error is raised after the batches before it."""
        last = self._queues[-1]
        got = self._get(last)
        while got is not _DONE and not isinstance(got, _Failure):
            batch = list(got)
            while (got := self._next_waiting(last)) is not None and got is not _DONE and not isinstance(got, _Failure):
                batch.extend(got)
                if len(batch) >= SINK_MAX_ITEMS:
                    got = None
                    break
            yield batch
            if got is None:
                got = self._get(last)
        if isinstance(got, _Failure):
            raise got.exc

    @staticmethod
    def _next_waiting(q: queue.Queue):
        try:
            return q.get_nowait()
        except queue.Empty:
            return None

    # --- the threads ----------------------------------------------------------------------------------------------
    def _feed(self, batches: Iterator[list[Item]]) -> None:
        try:
            for items in batches:
                self._empty = False
                self._started.set()
                if self._halt.is_set() or not self._put(self._queues[0], items):
                    break
            self._put(self._queues[0], _DONE)
        except BaseException as exc:
            self._put(self._queues[0], _Failure(exc))
        finally:
            self._started.set()

    def _work(self, stage: Stage, i: int) -> None:
        inbox, outbox = self._queues[i], self._queues[i + 1]
        # Set up in the stage's own thread once there is work (a rerun with nothing left loads no model), after
        # the stage before it: the generator loads alone and starts at once, and the next stage's load overlaps
        # its first batches instead of competing with its load (model loading is mostly Python, under the GIL).
        if not self._wait(self._started) or (i and not self._wait(self._ready[i - 1])):
            return
        try:
            if not self._empty and not self._setup_failed:  # after a set-up failure upstream, no batch will come
                stage.setup()
        except BaseException as exc:
            self._setup_failed = True
            self._ready[i].set()
            self._give_up(_Failure(exc), inbox, outbox)
            return
        self._ready[i].set()
        while True:
            got = self._get(inbox)
            if got is _DONE or isinstance(got, _Failure):
                self._put(outbox, got)
                return
            try:
                done = run_stage(stage, got)
            except BaseException as exc:  # not an item's failure (run_stage records those): a broken stage
                self._give_up(_Failure(exc), inbox, outbox)
                return
            if not self._put(outbox, done):
                return

    def _give_up(self, failure: _Failure, inbox: queue.Queue, outbox: queue.Queue) -> None:
        """Send ``failure`` on behind what went before, stop the source, and drop what still arrives."""
        self._halt.set()
        self._put(outbox, failure)
        while (got := self._get(inbox)) is not _DONE and not isinstance(got, _Failure):
            pass

    # --- waiting, with an eye on the stop flag ----------------------------------------------------------------
    def _wait(self, event: threading.Event) -> bool:
        while not event.wait(_POLL_S):
            if self._stop.is_set():
                return False
        return True

    def _put(self, q: queue.Queue, value) -> bool:
        while not self._stop.is_set():
            try:
                q.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return _DONE
