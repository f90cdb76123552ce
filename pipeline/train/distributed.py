"""The training loop on Ray Train: a ``TorchTrainer`` with one worker per GPU (or CPU workers), data-parallel.

The workers run the same ``train_worker`` as the local executor, with a context that knows their rank, wraps
the UNet in DistributedDataParallel (``ray.train.torch.prepare_model``; gloo on CPU, NCCL on GPU) and averages
the logged loss over the workers. The samples travel once through the object store, not once per worker read.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from pipeline.errors import GenpipeError
from pipeline.train.loop import WorkerContext, WorkerJob, train_worker


class TrainFailed(GenpipeError):
    """Training started but a worker failed (the message carries the worker's error)."""

    exit_code = 1


class RayWorkerContext(WorkerContext):
    """Rank, device and collectives of a Ray Train worker; progress lines go to the driver through a Ray queue
    (the worker logs themselves stay on the cluster)."""

    @classmethod
    def current(cls, progress=None) -> RayWorkerContext:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        return cls(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=str(device),
                   extra={"progress": progress})  # fmt: skip

    def log(self, line: str) -> None:
        queue = self.extra.get("progress")
        if queue is None:
            super().log(line)
        else:
            queue.put(line)

    def wrap(self, model):
        import ray.train.torch

        if self.world_size == 1:
            return model
        # The model is on its device already (frozen parts in the mixed-precision dtype); only wrap it.
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")

    def no_sync(self, model, last_micro: bool):
        if self.world_size > 1 and not last_micro:
            return model.no_sync()
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def _ray_worker(config: dict[str, Any]) -> None:
    import ray

    job: WorkerJob = config["job"]
    job.data = ray.get(config["data"])
    train_worker(job, RayWorkerContext.current(config.get("progress")))


def connect(spec) -> None:
    """Start or join Ray and check that it can place ``resources.workers`` workers of this spec; a ``SpecError``
    naming what does not fit otherwise (Ray Train would wait for them forever, silently).
    GENPIPE_NO_PRECHECK=1 skips the check (autoscaling clusters grow later)."""
    import os

    import ray

    from pipeline.cluster.resources import check_fit
    from pipeline.errors import SpecError
    from pipeline.executors.ray_data import init_ray

    init_ray()
    if os.environ.get("GENPIPE_NO_PRECHECK") == "1":
        return
    res = spec.resources
    worker = {"count": res.workers, "num_gpus": 1.0 if res.use_gpu else 0.0, "num_cpus": res.cpus_per_worker}
    plan = {
        "actors": {"training worker": worker},
        "tasks": {"trainer": {"num_cpus": 0.0}},
        "total_gpus": worker["count"] * worker["num_gpus"],
        "total_cpus": worker["count"] * worker["num_cpus"],
    }
    problems = check_fit(plan, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if problems:
        raise SpecError(
            f"resources: the Ray cluster cannot run this training: {problems[0]}; lower resources.workers / "
            "resources.cpus_per_worker / resources.use_gpu or add nodes (GENPIPE_NO_PRECHECK=1 on an autoscaling "
            "cluster)",
            problems=problems[1:],
        )


def run_on_ray(job: WorkerJob) -> None:
    """Run ``job`` on ``resources.workers`` Ray Train workers and wait; ``TrainFailed`` with the cause on error."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.executors.ray_data import init_ray

    init_ray()
    res = job.spec.resources
    data_ref = ray.put(job.data)
    light = WorkerJob(spec=job.spec, model_path=job.model_path, data=None, quiet=job.quiet)  # type: ignore[arg-type]
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    progress = None if job.quiet else Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": light, "data": data_ref, "progress": progress},
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"genpipe-train-{job.spec.name}",
            storage_path=res.storage_path,
            # A restarted worker group resumes from the newest checkpoint under the output.
            failure_config=FailureConfig(max_failures=res.max_failures),
        ),
    )
    try:
        _fit_relaying(trainer, progress)
    except Exception as exc:  # ray.train.TrainingFailedError wraps the worker's exception
        cause = exc
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise TrainFailed(f"training failed on a Ray Train worker: {type(cause).__name__}: {cause}") from exc


def _fit_relaying(trainer, progress) -> None:
    """``trainer.fit()``, printing the progress lines rank 0 sends meanwhile."""
    if progress is None:
        trainer.fit()
        return
    import queue as stdlib_queue
    import threading

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not progress.empty():
        try:
            print(progress.get(timeout=1.0), file=sys.stderr, flush=True)
        except stdlib_queue.Empty:
            continue
    progress.shutdown()
    if failure:
        raise failure[0]
