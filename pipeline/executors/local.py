"""The in-process executor: every stage set up once, then each batch through the stage list, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeline.executors.common import run_stages
from pipeline.stages.base import Stage
from schemas.record import Item


def run_local(stages: list[Stage], batches: Iterable[list[Item]], sink: Callable[[list[Item]], None]) -> None:
    for stage in stages:
        stage.setup()
    for items in batches:
        sink(run_stages(stages, items))
