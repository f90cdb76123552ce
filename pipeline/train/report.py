"""What a training run leaves next to its adapter: ``loss.csv``, ``loss.png``, ``report.json`` and ``report.md``.

``finish`` runs on rank 0 after the last step: it writes the adapter, the loss curve, runs the evaluation and
writes the report. Everything goes through ``Storage`` (atomic writes), so any fsspec output works.
"""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

from pipeline.storage import Storage
from pipeline.train.model import ADAPTER_FILE as ADAPTER_KEY
from schemas.train import TrainSpec

LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: Steps averaged at each end of the curve for the "first / last" loss means in the report.
WINDOW = 10


def finish(store: Storage, spec: TrainSpec, job, parts, history: list[dict], resumed_from: int,
           elapsed_s: float) -> dict[str, Any]:  # fmt: skip
    from pipeline.train.model import adapter_bytes

    adapter = adapter_bytes(parts.unet, parts.lora_config)
    store.write_atomic(ADAPTER_KEY, adapter)
    store.write_atomic(LOSS_CSV, loss_csv(history))
    store.write_atomic(LOSS_PNG, loss_plot(history, spec.name))
    report = {
        "name": spec.name,
        "base_model": spec.model.id,
        "model_path": job.model_path,
        "adapter": store.url(ADAPTER_KEY),
        "steps": history[-1]["step"] if history else 0,
        "resumed_from_step": resumed_from,
        "workers": spec.resources.workers if spec.executor == "ray" else 1,
        "samples": job.data.summary(),
        "loss": loss_summary(history),
        "lora": {**spec.lora.model_dump(mode="json"), "alpha": spec.lora_alpha},
        "train_seconds_this_run": round(elapsed_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if spec.evaluation.enabled:
        from pipeline.train.evaluate import evaluate

        report["evaluation"] = evaluate(store, spec, job, parts, adapter, str(parts.unet.device))
    store.write_atomic(REPORT_JSON, json.dumps(report, indent=1).encode())
    store.write_atomic(REPORT_MD, render_markdown(report).encode())
    return report


def loss_summary(history: list[dict]) -> dict[str, Any]:
    losses = [row["loss"] for row in history]
    if not losses:
        return {}
    n = max(1, min(WINDOW, len(losses) // 2))  # two windows that do not overlap
    return {"first_mean": _mean(losses[:n]), "last_mean": _mean(losses[-n:]), "window": n,
            "final": round(losses[-1], 6), "min": round(min(losses), 6)}  # fmt: skip


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)


def loss_csv(history: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "epoch", "loss", "lr", "time_s"])
    for row in history:
        writer.writerow([row["step"], row["epoch"], f"{row['loss']:.6f}", f"{row['lr']:.6g}", row["time_s"]])
    return buf.getvalue().encode()


def loss_plot(history: list[dict], title: str) -> bytes:
    """The per-step loss and its moving average (window ``WINDOW``), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    losses = [row["loss"] for row in history]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= WINDOW:
        smooth = [_mean(losses[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {WINDOW}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_title(f"{title}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_markdown(r: dict[str, Any]) -> str:
    s, loss = r["samples"], r["loss"]
    skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) or "none"
    lines = [
        f"# LoRA training report: {r['name']}",
        "",
        f"- base model: `{r['base_model']}`",
        f"- adapter: `{r['adapter']}` (rank {r['lora']['rank']}, alpha {r['lora']['alpha']}, "
        f"targets {', '.join(r['lora']['target_modules'])})",
        f"- steps: {r['steps']}" + (f" (resumed from step {r['resumed_from_step']})" if r["resumed_from_step"] else ""),
        f"- workers: {r['workers']}; training time this run: {r['train_seconds_this_run']} s",
        f"- samples: {s['total']} read, {s['train']} trained on, {s['holdout']} held out; skipped: {skipped}",
    ]
    if loss:
        w = loss["window"]
        lines.append(f"- loss: mean of the first {w} steps {loss['first_mean']:.4f}, of the last {w} "
                     f"{loss['last_mean']:.4f}; final {loss['final']:.4f} (`loss.csv`, `loss.png`)")  # fmt: skip
    for example in s["skipped_examples"]:
        lines.append(f"  - skipped {example}")
    ev = r.get("evaluation")
    if ev:
        lines += ["", "## Evaluation: without vs with the adapter", "", "| | without | with |", "|---|---|---|"]
        vl = ev["validation_loss"]
        lines.append(f"| validation loss ({ev['holdout']} held-out samples) | "
                     + (f"{vl['base']:.4f} | {vl['lora']:.4f} |" if vl else "n/a | n/a |"))  # fmt: skip
        clip = ev["clip"]
        if "skipped" in clip:
            lines += ["", f"CLIP alignment: skipped — {clip['skipped']}."]
        else:
            for key in ("clipscore", "clip_cosine"):
                lines.append(f"| mean {key} | {clip['base'][key]:.4f} | {clip['lora'][key]:.4f} |")
            lines += ["", f"CLIP backbone: `{clip['backbone']}`."]
        if ev["images"]:
            lines += ["", "| prompt | without | with | mean abs pixel diff |", "|---|---|---|---|"]
            for row in ev["images"]:
                base = f"![]({row['base']})" if "base" in row else row.get("base_error", "failed")
                lora = f"![]({row['lora']})" if "lora" in row else row.get("lora_error", "failed")
                prompt = " ".join(str(row["prompt"]).split()).replace("|", "\\|")  # one table row, four cells
                lines.append(f"| {prompt} | {base} | {lora} | {row.get('mean_abs_pixel_diff', 'n/a')} |")
    return "\n".join(lines) + "\n"
