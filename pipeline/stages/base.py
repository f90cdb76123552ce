"""The stage contract: a name, declared resources, ``setup()`` once per worker, one batch method.

The same stage objects run in the in-process loop (``pipeline.executors.local``) and inside Ray Data
actors (``pipeline.executors.ray_data``). A stage must be cheap to construct and picklable: anything
heavy (models, clients) is created in ``setup()``, on the worker that will use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.record import Item


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the scheduler for."""

    num_cpus: float = 0.25
    num_gpus: float = 0.0
    concurrency: int = 1
    """Number of workers (actors) for stateful stages."""
    stateful: bool = True
    """Stateful stages run in an actor pool and keep what ``setup()`` loaded; others run as tasks."""


class Stage:
    """Base class. Subclasses set ``name`` and implement ``process``."""

    name: str = "stage"
    resources: Resources = Resources()

    def setup(self) -> None:
        """Load models / open clients. Called once per worker before the first batch."""

    def process(self, items: list[Item]) -> list[Item]:
        """Return the batch with this stage's work done. Items that are not ``pending`` pass through."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
