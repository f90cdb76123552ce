"""What a spec asks the Ray scheduler for, and whether a cluster's nodes can give it.

``resource_plan`` reads the ``Resources`` the job's stages declare (the same objects the executor turns into
``map_batches(num_gpus=..., num_cpus=..., concurrency=...)``), so the numbers checked before a submission are
the numbers requested at run time. ``check_fit`` places every actor the way Ray Data does by default (SPREAD:
the least-loaded node that fits), one GPU at a time (a fractional request must fit on one GPU; Ray takes
requests above 1 as whole GPUs on one node), then asks for room for the largest task: actor pools that
leave no node a task's CPUs wait forever, which is the hang this check exists to prevent.
"""

from __future__ import annotations

import math
from typing import Any

from schemas.spec import JobSpec

#: Stage name → the role the plan and the messages use.
ROLES = {"generate": "generator", "score": "scorer", "write": "writer"}
#: What an operator changes when a role does not fit.
KNOBS = {
    "generator": "resources.generator_actors / resources.gpus_per_actor / resources.cpus_per_actor",
    "scorer": "scoring.actors / resources.scorer_gpu_fraction / scoring.cpus_per_actor",
}
_EPS = 1e-9


def resource_plan(spec: JobSpec) -> dict[str, Any]:
    """The actor pools and tasks of a Ray run of ``spec``::

    {"actors": {"generator": {"count": 8, "num_gpus": 1.0, "num_cpus": 4.0},
                "scorer":    {"count": 8, "num_gpus": 0.25, "num_cpus": 0.5}},
     "tasks":  {"writer": {"num_cpus": 0.25}, "reader": {"num_cpus": 0.1}},
     "total_gpus": 10.0,    # every actor at once
     "total_cpus": 36.25}   # every actor at once + the largest task (the least that makes progress)
    """
    from pipeline.executors.ray_data import READ_CPUS
    from pipeline.runner import build_stages  # the very stage list run_job hands to the executor

    actors: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, float]] = {}
    for stage in build_stages(spec):
        res, role = stage.resources, ROLES.get(stage.name, stage.name)
        if res.stateful:
            actors[role] = {"count": res.concurrency, "num_gpus": float(res.num_gpus), "num_cpus": float(res.num_cpus)}
        else:
            tasks[role] = {"num_cpus": float(res.num_cpus)}
    tasks["reader"] = {"num_cpus": float(READ_CPUS)}
    total_gpus = sum(a["count"] * a["num_gpus"] for a in actors.values())
    total_cpus = sum(a["count"] * a["num_cpus"] for a in actors.values()) + max(t["num_cpus"] for t in tasks.values())
    return {"actors": actors, "tasks": tasks, "total_gpus": _round(total_gpus), "total_cpus": _round(total_cpus)}


def describe(plan: dict[str, Any]) -> str:
    """``8 generator actors × 1 GPU + 8 scorer actors × 0.25 GPU`` (GPU users only; CPU when none use GPUs)."""
    key, unit = ("num_gpus", "GPU") if plan["total_gpus"] else ("num_cpus", "CPU")
    parts = [
        f"{a['count']} {role} actor{'s' * (a['count'] != 1)} × {_num(a[key])} {unit}"
        for role, a in plan["actors"].items()
        if a[key]
    ]
    return " + ".join(parts) or "no actors"


def check_fit(plan: dict[str, Any], nodes: list[dict[str, float]]) -> list[str]:
    """Problems placing ``plan`` on ``nodes`` (each a node's total resources, e.g. ``{"CPU": 8, "GPU": 1}``);
    empty when everything fits. Autoscaling clusters grow later: callers offer a way to skip this."""
    problems = _whole_gpu_problems(plan)
    cluster_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    cluster_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    if plan["total_gpus"] > cluster_gpus + _EPS:
        have = f"{_num(cluster_gpus)}" if cluster_gpus else "no"
        problems.append(
            f"the spec asks for {_num(plan['total_gpus'])} GPUs ({describe(plan)}) but the cluster has {have} GPUs"
        )
    if plan["total_cpus"] > cluster_cpus + _EPS:
        problems.append(
            f"the spec asks for {_num(plan['total_cpus'])} CPUs (actors plus one task) "
            f"but the cluster has {_num(cluster_cpus)}"
        )
    max_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    max_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    for role, a in plan["actors"].items():
        if a["num_gpus"] > max_gpus + _EPS and cluster_gpus:
            problems.append(
                f"each {role} actor asks for {_num(a['num_gpus'])} GPUs but the largest node has {_num(max_gpus)}"
            )
        if a["num_cpus"] > max_cpus + _EPS:
            problems.append(
                f"each {role} actor asks for {_num(a['num_cpus'])} CPUs but the largest node has {_num(max_cpus)}"
            )
    return problems or _packing_problems(plan, nodes)


def _whole_gpu_problems(plan: dict[str, Any]) -> list[str]:
    return [
        f"{role} actors ask for {_num(a['num_gpus'])} GPUs each; above 1 Ray needs a whole number"
        for role, a in plan["actors"].items()
        if a["num_gpus"] > 1 and not float(a["num_gpus"]).is_integer()
    ]


class _Node:
    """A node's free CPUs and the free share of each of its GPUs."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.cpus = resources.get("CPU", 0.0)
        gpus = resources.get("GPU", 0.0)
        self.gpus = [1.0] * int(gpus) + ([gpus - int(gpus)] if gpus - int(gpus) > _EPS else [])

    def _gpu_slots(self, num_gpus: float) -> list[int] | None:
        """Which GPUs a request would take, or None when it does not fit."""
        if num_gpus <= 0:
            return []
        if num_gpus > 1 or math.isclose(num_gpus, 1.0):  # whole GPUs
            free = [i for i, g in enumerate(self.gpus) if g >= 1.0 - _EPS]
            return free[: round(num_gpus)] if len(free) >= round(num_gpus) else None
        fits = [i for i, g in enumerate(self.gpus) if g >= num_gpus - _EPS]  # a share of one GPU: the tightest
        return [min(fits, key=lambda j: self.gpus[j])] if fits else None

    def fits(self, num_gpus: float, num_cpus: float) -> bool:
        return num_cpus <= self.cpus + _EPS and self._gpu_slots(num_gpus) is not None

    def take(self, num_gpus: float, num_cpus: float) -> None:
        for i in self._gpu_slots(num_gpus) or []:
            self.gpus[i] -= min(1.0, num_gpus)
        self.cpus -= num_cpus


def _packing_problems(plan: dict[str, Any], nodes: list[dict[str, float]]) -> list[str]:
    free = [_Node(n) for n in nodes]
    units = [(a["num_gpus"], a["num_cpus"], role) for role, a in plan["actors"].items() for _ in range(a["count"])]
    for num_gpus, num_cpus, role in sorted(units, reverse=True):
        candidates = [node for node in free if node.fits(num_gpus, num_cpus)]
        if not candidates:
            return [
                f"the actors do not fit on the nodes together: a {role} actor ({_num(num_gpus)} GPU, "
                f"{_num(num_cpus)} CPU) finds no node with room once the others are placed ({describe(plan)})"
            ]
        max(candidates, key=lambda n: (n.cpus, sum(n.gpus))).take(num_gpus, num_cpus)  # SPREAD: least loaded
    task, task_cpus = max(((name, t["num_cpus"]) for name, t in plan["tasks"].items()), key=lambda x: x[1])
    if not any(node.cpus >= task_cpus - _EPS for node in free):
        left = ", ".join(_num(node.cpus) for node in free)
        return [
            f"once the actors are spread over the nodes (CPUs left: {left}), no node has the {_num(task_cpus)} CPU "
            f"a {task} task needs, so the job would wait forever"
        ]
    return []


def _round(x: float) -> float:
    return round(x, 6)


def _num(x: float) -> str:
    return f"{x:g}"
