"""The Ray Data executor: read_parquet(plan) → map_batches per stage (actor pools for stateful stages) →
records streamed back to the driver, which is the single writer of the audit store.

Stages run unchanged inside Ray: a stateful stage is constructed once per actor and ``setup()`` runs there,
on the worker, so GPU choice and model loading happen where the model will run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable

import pyarrow as pa

from pipeline.errors import GenpipeError
from pipeline.executors.common import SINK_MAX_ITEMS, coalesced, run_stage
from pipeline.executors.shards import read_batch
from pipeline.metrics import record_stage_latency
from pipeline.stages.base import Stage
from pipeline.storage import Storage
from schemas.record import Item, items_from_table, items_to_table

# Read tasks are tiny (plan shards); a small CPU share keeps them from starving actors on small machines.
READ_CPUS = 0.1
MAX_READERS = 4  # concurrent read tasks at most: one read (~1 ms) keeps several generator actors fed


def fault_probability(stage_name: str) -> float:
    """Fault injection for tests and drills: ``GENPIPE_FAULT_KILL_GENERATOR=0.3`` makes a generator actor die
    (``os._exit(1)``, no clean-up, like a segfault or an OOM kill) before returning a batch with probability
    0.3. Any stage name works (``GENPIPE_FAULT_KILL_WRITE``...). Only ever read inside Ray actors."""
    name = "GENERATOR" if stage_name == "generate" else stage_name.upper()
    try:
        return float(os.environ.get(f"GENPIPE_FAULT_KILL_{name}", "0"))
    except ValueError:
        return 0.0


class _StageActor:
    """Holds one stage in a Ray actor: constructed and set up once, then called per batch."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.setup()
        self._kill_p = fault_probability(stage.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        items = run_stage(self.stage, items_from_table(batch))
        record_stage_latency(self.stage.name, time.perf_counter() - start)
        if self._kill_p and items and _fault_fires(self._kill_p, items[0].item_id):
            os._exit(1)  # the injected fault: Ray restarts the actor and retries the batch
        return items_to_table(items)


def _fault_fires(p: float, batch_id: str) -> bool:
    """Draw the injected fault for one batch. With GENPIPE_FAULT_SEED the draws are reproducible: each try of a
    batch draws from (seed, batch, kills so far), so a drill replays exactly. GENPIPE_FAULT_LOG names a file that
    gets one line per kill, so a test can prove the faults happened."""
    log = os.environ.get("GENPIPE_FAULT_LOG")
    seed = os.environ.get("GENPIPE_FAULT_SEED")
    if seed is not None:
        previous = 0
        if log and os.path.exists(log):
            with open(log) as f:
                previous = sum(1 for line in f if line.strip() == batch_id)
        rng = random.Random(f"{seed}:{batch_id}:{previous}")
    else:
        rng = random.Random()
    if rng.random() >= p:
        return False
    if log:
        with open(log, "a") as f:
            f.write(batch_id + "\n")
    return True


def _stateless(batch: pa.Table, stage: Stage) -> pa.Table:
    stage.setup()
    start = time.perf_counter()
    out = items_to_table(run_stage(stage, items_from_table(batch)))
    record_stage_latency(stage.name, time.perf_counter() - start)
    return out


#: How long ``init_ray`` waits for the head node named in RAY_ADDRESS to accept a connection.
CONNECT_TIMEOUT_S = 5.0
_HOST_PORT = re.compile(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d{1,5})")


def check_reachable(address: str) -> None:
    """A one-line error now when RAY_ADDRESS names a ``host:port`` nothing answers on; ``ray.init`` itself
    retries an unreachable head for minutes, printing C++ warnings. ``auto`` and other forms are Ray's."""
    match = _HOST_PORT.fullmatch(address.strip())
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise GenpipeError(
            f"RAY_ADDRESS={address}: cannot connect to the Ray head ({reason} within {CONNECT_TIMEOUT_S:g} s); "
            "is the cluster up? unset RAY_ADDRESS to run on a local Ray"
        ) from None


def init_ray(num_cpus: float | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray for this process."""
    import ray

    if not ray.is_initialized():
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
        if os.environ.get("RAY_ADDRESS"):
            check_reachable(os.environ["RAY_ADDRESS"])
            # Inside a submitted job the job's own runtime_env (working_dir, env_vars) already applies; ours must
            # override rather than fail to merge when both name HF_HUB_OFFLINE.
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data's periodic INFO progress dumps would bury genpipe's own progress line.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _read_plan_batch(batch: pa.Table, storage: Storage) -> pa.Table:
    """One plan batch (a generator batch) per input row: (shard key, batch index) → items."""
    keys, indexes = batch.column("shard").to_pylist(), batch.column("batch").to_pylist()
    return pa.concat_tables([read_batch(storage, key, i) for key, i in zip(keys, indexes, strict=True)])


def run_ray(
    stages: list[Stage],
    plan_batches: list[tuple[str, int]],
    storage: Storage,
    batch_size: int,
    sink: Callable[[list[Item]], None],
) -> None:
    """Run ``stages`` over the plan's batches ((shard key, batch index) pairs; one generator batch each).

    The dataset starts from the list of plan batches (a few bytes each, built in the driver) instead of a file
    listing: every Ray Data operator then runs with the fractional CPUs we give it, so on a small machine no
    listing or repartition task waits for a whole free CPU behind the actors. The read step is a small, fixed
    pool of tasks: left unbounded, Ray Data runs ~1/READ_CPUS reads at once, each in a new ~200 MB worker
    process that spends seconds importing, for work that takes a millisecond."""
    import ray

    readers = max(1, min(MAX_READERS, stages[0].resources.concurrency if stages else 1))
    ds = ray.data.from_items([{"shard": key, "batch": i} for key, i in plan_batches])
    ds = ds.map_batches(_read_plan_batch, fn_kwargs={"storage": storage}, batch_size=1, batch_format="pyarrow",
                        num_cpus=READ_CPUS, compute=ray.data.TaskPoolStrategy(size=readers))  # fmt: skip
    for stage in stages:
        res = stage.resources
        fault_env = {k: v for k, v in os.environ.items() if k.startswith("GENPIPE_FAULT_")}
        extra = {"runtime_env": {"env_vars": fault_env}} if fault_env else {}
        if res.stateful:
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": stage},
                batch_size=batch_size,
                batch_format="pyarrow",
                # A fixed-size pool: every actor starts (and loads its model) up front. Ray Data restarts an actor
                # that dies and retries its batch (max_restarts / max_task_retries default to -1 for actor pools);
                # exactly-once output comes from deterministic item ids and keys, not from Ray.
                compute=ray.data.ActorPoolStrategy(size=res.concurrency),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus or None,
                **extra,
            )
        else:
            ds = ds.map_batches(
                _stateless,
                fn_kwargs={"stage": stage},
                batch_size=batch_size,
                batch_format="pyarrow",
                num_cpus=res.num_cpus,
                **extra,
            )
    results = (items_from_table(batch) for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    with contextlib.closing(coalesced(results, SINK_MAX_ITEMS)) as coalesced_results:
        for items in coalesced_results:  # the driver writes what has piled up in one transaction
            sink(items)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True
