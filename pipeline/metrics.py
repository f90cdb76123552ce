"""Run metrics on Ray's Prometheus endpoint (``ray.util.metrics``): images by outcome, per-stage latency.

Every call is a no-op outside Ray (the local executor, unit tests), so callers never check.
Exported names: ``genpipe_items_total{job,status}``, ``genpipe_images_flagged_total{job,decision}`` and
``genpipe_stage_seconds{stage}`` (per batch).
"""

from __future__ import annotations

from collections import Counter

_LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_metrics: dict[str, object] = {}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _get(name: str):
    if name not in _metrics:
        from ray.util import metrics

        if name == "items":
            _metrics[name] = metrics.Counter(
                "genpipe_items_total", description="Items reaching a terminal status.", tag_keys=("job", "status")
            )
        elif name == "flagged":
            _metrics[name] = metrics.Counter(
                "genpipe_images_flagged_total", description="Images sent to review or blocked.",
                tag_keys=("job", "decision"),
            )  # fmt: skip
        elif name == "stage":
            _metrics[name] = metrics.Histogram(
                "genpipe_stage_seconds", description="Wall time of one batch in one stage.",
                boundaries=_LATENCY_BOUNDARIES, tag_keys=("stage",),
            )  # fmt: skip
    return _metrics[name]


def record_items(job: str, statuses: Counter, decisions: Counter) -> None:
    if not _ray_ready():
        return
    for status, n in statuses.items():
        _get("items").inc(n, tags={"job": job, "status": status})
    for decision in ("review", "block"):
        if decisions.get(decision):
            _get("flagged").inc(decisions[decision], tags={"job": job, "decision": decision})


def record_stage_latency(stage: str, seconds: float) -> None:
    if not _ray_ready():
        return
    _get("stage").observe(seconds, tags={"stage": stage})
