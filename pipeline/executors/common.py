"""What both executors share: running one stage on a batch so that a stage error fails items, not the job."""

from __future__ import annotations

from pipeline.stages.base import Stage
from schemas.record import Item


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
