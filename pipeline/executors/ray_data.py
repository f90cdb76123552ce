"""The Ray Data executor: read_parquet(plan) → map_batches per stage (actor pools for stateful stages) →
records streamed back to the driver, which is the single writer of the audit store.

Stages run unchanged inside Ray: a stateful stage is constructed once per actor and ``setup()`` runs there,
on the worker, so GPU choice and model loading happen where the model will run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyarrow as pa

from pipeline.executors.common import run_stage
from pipeline.stages.base import Stage
from schemas.record import Item, items_from_table, items_to_table

# Read tasks are tiny (plan shards); a small CPU share keeps them from starving actors on small machines.
READ_CPUS = 0.1


class _StageActor:
    """Holds one stage in a Ray actor: constructed and set up once, then called per batch."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return items_to_table(run_stage(self.stage, items_from_table(batch)))


def _stateless(batch: pa.Table, stage: Stage) -> pa.Table:
    stage.setup()
    return items_to_table(run_stage(stage, items_from_table(batch)))


def init_ray(num_cpus: float | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray for this process."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_ray(
    stages: list[Stage],
    plan_paths: list[str],
    batch_size: int,
    sink: Callable[[list[Item]], None],
    filesystem=None,
) -> None:
    import ray

    ds = ray.data.read_parquet(plan_paths, filesystem=filesystem, num_cpus=READ_CPUS)
    # Plan shards are read a file per block; streaming repartition cuts them into generator-sized blocks
    # so every actor of the pool gets work from the first shard on.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    for stage in stages:
        res = stage.resources
        if res.stateful:
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": stage},
                batch_size=batch_size,
                batch_format="pyarrow",
                concurrency=res.concurrency,
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus or None,
                # An actor that dies is restarted and its batch retried; exactly-once comes from item ids.
                max_restarts=-1,
                max_task_retries=-1,
            )
        else:
            ds = ds.map_batches(
                _stateless,
                fn_kwargs={"stage": stage},
                batch_size=batch_size,
                batch_format="pyarrow",
                num_cpus=res.num_cpus,
                max_retries=3,
            )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        sink(items_from_table(batch))


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True
