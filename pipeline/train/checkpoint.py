"""Resumable checkpoints under ``{output}/checkpoints/step-N/``, written and read through ``Storage``.

A checkpoint holds the LoRA parameters (``lora.safetensors``), the AdamW and learning-rate scheduler states
(``optimizer.pt``, ``scheduler.pt``, loaded with ``weights_only=True``) and ``state.json`` — the step, the loss
history so far, and the seed. ``state.json`` is written last, so a checkpoint without it (a run killed while
saving) is ignored. There is no separate RNG state to restore: every random draw of step *s* on worker *r*
(data order, noise, timesteps, VAE sampling, LoRA dropout) comes from generators seeded by (seed, s, r), so the
step number is the RNG state and a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import Storage

PREFIX = "checkpoints"
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class Resumed:
    """What a checkpoint restores besides the tensors."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    """The whole ``state.json`` (the loop keeps e.g. the fp16 gradient scaler's state there)."""


def checkpoint_steps(store: Storage) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    steps = []
    for key in store.walk(PREFIX):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == STATE_FILE and (m := _STEP_RE.fullmatch(parts[1])):
            steps.append(int(m.group(1)))
    return sorted(steps)


def save_checkpoint(store: Storage, step: int, unet, optimizer, lr_scheduler, state: dict[str, Any],
                    keep: int) -> str:  # fmt: skip
    """Write the checkpoint of ``step`` (state.json last), then drop all but the newest ``keep``."""
    import torch
    from safetensors.torch import save

    from pipeline.train.model import trainable_state

    base = f"{PREFIX}/step-{step}"
    store.write_atomic(f"{base}/lora.safetensors", save(trainable_state(unet)))
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", lr_scheduler.state_dict())):
        buf = io.BytesIO()
        torch.save(obj, buf)
        store.write_atomic(f"{base}/{name}", buf.getvalue())
    store.write_atomic(f"{base}/{STATE_FILE}", json.dumps({**state, "step": step}, indent=1).encode())
    for old in checkpoint_steps(store)[:-keep]:
        store.delete(f"{PREFIX}/step-{old}")
    return store.url(base)


def load_latest(store: Storage, unet, optimizer, lr_scheduler) -> Resumed:
    """Restore the newest complete checkpoint into the given objects; ``Resumed()`` (step 0) when there is none."""
    import torch
    from safetensors.torch import load

    from pipeline.train.model import load_trainable_state

    steps = checkpoint_steps(store)
    if not steps:
        return Resumed()
    base = f"{PREFIX}/step-{steps[-1]}"
    state = json.loads(store.read(f"{base}/{STATE_FILE}"))
    load_trainable_state(unet, load(store.read(f"{base}/lora.safetensors")))
    optimizer.load_state_dict(torch.load(io.BytesIO(store.read(f"{base}/optimizer.pt")), weights_only=True))
    lr_scheduler.load_state_dict(torch.load(io.BytesIO(store.read(f"{base}/scheduler.pt")), weights_only=True))
    return Resumed(step=int(state["step"]), history=list(state.get("history", [])), state=state)
