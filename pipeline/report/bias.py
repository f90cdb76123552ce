"""The set-level bias report: per job, per campaign and per prompt template, the distribution of each perceived
attribute over the images that show a person, its skew, and flags; written as markdown, JSON and one PNG per
attribute.

Input is the audit records (``AuditStore.iter_items``), streamed: memory grows with the number of groups, not
images. Only ``generated`` images count. An image with no person is counted as such and left out of the attribute
distributions (never a zero); one whose bias probes failed (``scorer_error``) is counted as unscored.

Metrics on a group's mean probability vector p over its K classes (soft counts; argmax counts are reported too):
  mad                     (1/K) sum_k |p_k - 1/K|               DALL-Eval mean absolute deviation, every attribute
  heim_gender_imbalance   |P(female) - 0.5|                     equals mad for gender
  heim_skin_tone_imbalance sum_i |P(MST_i) - 0.1| / 10           equals mad for skin tone
A group is flagged for an attribute when its mad reaches ``scoring.bias.flag_thresholds[attribute]`` and it has at
least ``min_group_size`` person images; smaller groups are reported as ``insufficient``, never flagged.

A prompt template is ``metadata.template`` (or ``metadata.prompt_template``) when the manifest carries one, else
the prompt id without its trailing number (``spring-hero-01`` → ``spring-hero``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipeline.report.charts import TAB10, stacked_bars_png
from pipeline.scoring.bias import (
    ATTRIBUTES,
    gender_imbalance,
    mean_absolute_deviation,
    skin_tone_imbalance,
)
from schemas.record import Item
from schemas.spec import BiasSpec

REPORT_PREFIX = "reports/bias"
#: The Monk Skin Tone scale's ten reference colours (MST 1 → 10), used for the skin-tone plot.
MST_COLOURS = ("#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96",
               "#a07e56", "#825c43", "#604134", "#3a312a", "#292420")  # fmt: skip
LEVELS = ("job", "campaign", "template")
_TRAILING_NUMBER = re.compile(r"[-_.]?\d+$")


def template_of(item: Item) -> str:
    meta = item.metadata or {}
    for key in ("template", "prompt_template"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    return _TRAILING_NUMBER.sub("", item.prompt_id) or item.prompt_id


@dataclass
class GroupStats:
    level: str
    name: str | None  # None: the images with no campaign (a campaign may be named anything, "(none)" included)
    images: int = 0
    unscored: int = 0
    person: int = 0
    no_person: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    argmax: dict[str, np.ndarray] = field(default_factory=dict)
    attr_images: dict[str, int] = field(default_factory=dict)

    def add(self, item: Item) -> None:
        self.images += 1
        s = item.scores
        if not isinstance(s.get("bias_person_present"), bool):
            self.unscored += 1
            return
        if not s["bias_person_present"]:
            self.no_person += 1
            return
        self.person += 1
        for name, attr in ATTRIBUTES.items():
            vals = [s.get(f"{attr.key}_{c}") for c in attr.classes]
            if any(not isinstance(v, int | float) for v in vals):
                continue
            vec = np.asarray(vals, dtype=np.float64)
            self.sums.setdefault(name, np.zeros(len(attr.classes)))
            self.argmax.setdefault(name, np.zeros(len(attr.classes), dtype=np.int64))
            self.sums[name] += vec
            self.argmax[name][int(vec.argmax())] += 1
            self.attr_images[name] = self.attr_images.get(name, 0) + 1


def attribute_summary(stats: GroupStats, name: str, threshold: float | None, min_size: int) -> dict[str, Any]:
    attr = ATTRIBUTES[name]
    n = stats.attr_images.get(name, 0)
    out: dict[str, Any] = {"classes": list(attr.classes), "images": n, "threshold": threshold}
    if n == 0:
        return {**out, "status": "no_person_images", "distribution": None, "mad": None, "flagged": False}
    dist = stats.sums[name] / n
    mad = round(mean_absolute_deviation(dist), 6)  # flagged on the value shown, not on float noise below it
    out.update(
        distribution=dict(zip(attr.classes, (round(float(p), 6) for p in dist), strict=True)),
        argmax_counts=dict(zip(attr.classes, (int(c) for c in stats.argmax[name]), strict=True)),
        mad=mad,
    )
    if name == "gender":
        out["heim_gender_imbalance"] = round(gender_imbalance(dist[0]), 6)
    if name == "skin_tone":
        out["heim_skin_tone_imbalance"] = round(skin_tone_imbalance(dist), 6)
    flagged = threshold is not None and n >= min_size and mad >= threshold
    out["flagged"] = bool(flagged)
    out["status"] = "flagged" if flagged else ("ok" if n >= min_size else "insufficient")
    return out


def compute_bias_report(records: Iterable[Item], job: str, config: BiasSpec | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring)."""
    config = config or BiasSpec()
    groups: dict[tuple[str, str], GroupStats] = {}
    formats: set[str] = set()
    for it in records:
        if it.job != job or it.status != "generated":
            continue
        formats.add(it.format)
        campaign = it.campaign if it.campaign and it.campaign.strip() else None  # blank is no campaign
        keys = [("job", job), ("campaign", campaign), ("template", template_of(it))]
        for key in keys:
            groups.setdefault(key, GroupStats(*key)).add(it)
    attributes = [a for a in ("gender", "skin_tone", "age") if a in config.attributes]
    ordered = sorted(groups.values(), key=lambda g: (LEVELS.index(g.level), g.name is None, g.name or ""))
    out_groups, flags = [], []
    for g in ordered:
        entry: dict[str, Any] = {
            "level": g.level, "name": g.name, "images": g.images, "person": g.person,
            "no_person": g.no_person, "unscored": g.unscored, "attributes": {},
        }  # fmt: skip
        for a in attributes:
            summary = attribute_summary(g, a, config.flag_thresholds.get(a), config.min_group_size)
            entry["attributes"][a] = summary
            if summary["flagged"]:
                flags.append({"level": g.level, "name": g.name, "attribute": a, "metric": "mad",
                              "value": summary["mad"], "threshold": summary["threshold"]})  # fmt: skip
        out_groups.append(entry)
    notes = [
        "Perceived attributes from zero-shot CLIP probes: they measure skew across a set, not facts about anyone.",
        "Images with no person are counted in `no_person` and excluded from attribute distributions.",
    ]
    if formats - {"png"}:
        notes.append(
            f"Scores were computed on the generated pixels; images stored as {', '.join(sorted(formats - {'png'}))} "
            "are lossy re-encodings, so the stored bytes differ slightly from what was scored."
        )
    return {
        "job": job,
        "generated_at": datetime.now(UTC).isoformat(),
        "config": {
            "attributes": attributes,
            "flag_thresholds": dict(config.flag_thresholds),
            "min_group_size": config.min_group_size,
        },
        "groups": out_groups,
        "flags": flags,
        "notes": notes,
    }


# --- rendering ----------------------------------------------------------------------------------------------------


def _code(name: str | None) -> str:
    """A group name (campaigns are free text) as one line inside `...` in a table cell; no campaign in italics."""
    if name is None:
        return "_no campaign_"
    return "`" + " ".join(name.split()).replace("`", "'").replace("|", "\\|") + "`"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Bias report — job `{report['job']}`", "", f"Generated {report['generated_at']}.", ""]
    cfg = report["config"]
    lines += [f"Flag thresholds (mean absolute deviation): {cfg['flag_thresholds']}; "
              f"groups need at least {cfg['min_group_size']} person images to be flagged.", ""]  # fmt: skip
    lines += ["## Flags", ""]
    if report["flags"]:
        lines += [f"- **{f['level']} {_code(f['name'])}**: {f['attribute']} mad {f['value']:.3f} >= "
                  f"{f['threshold']}" for f in report["flags"]]  # fmt: skip
    else:
        lines.append("No group passes a threshold.")
    lines.append("")
    for level in LEVELS:
        rows = [g for g in report["groups"] if g["level"] == level]
        if not rows:
            continue
        lines += [f"## Per {level}", ""]
        head = "| group | images | person | no person | unscored |"
        sep = "|---|---:|---:|---:|---:|"
        for a in cfg["attributes"]:
            head += f" {a} mad | {a} status |"
            sep += "---:|---|"
        lines += [head, sep]
        for g in rows:
            row = f"| {_code(g['name'])} | {g['images']} | {g['person']} | {g['no_person']} | {g['unscored']} |"
            for a in cfg["attributes"]:
                s = g["attributes"][a]
                mad = "—" if s["mad"] is None else f"{s['mad']:.3f}"
                row += f" {mad} | {s['status']} |"
            lines.append(row)
        lines.append("")
    job = next((g for g in report["groups"] if g["level"] == "job"), None)
    if job:
        lines += ["## Job-level distributions", ""]
        for a in cfg["attributes"]:
            s = job["attributes"][a]
            if s["distribution"] is None:
                lines.append(f"- {a}: no images with a person")
                continue
            extra = {k: v for k, v in s.items() if k.startswith("heim_")}
            lines.append(f"- {a}: {s['distribution']}" + (f" — {extra}" if extra else ""))
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def render_plot(report: dict[str, Any], attribute: str, max_groups: int = 40) -> bytes:
    """One PNG: a stacked bar per group (its class distribution, or person / no person / unscored)."""
    groups = report["groups"][:max_groups]
    labels = [f"{g['level']}: {'—' if g['name'] is None else g['name']}" for g in groups]
    shares: list[list[float] | None]
    if attribute == "person":
        classes = ["person", "no_person", "unscored"]
        counts = [[g["person"], g["no_person"], g["unscored"]] for g in groups]
        shares = [[v / max(sum(r), 1) for v in r] for r in counts]
        xlabel = "share of images"
    else:
        classes = list(ATTRIBUTES[attribute].classes)
        dists = [g["attributes"][attribute]["distribution"] for g in groups]
        shares = [[d[c] for c in classes] if d else None for d in dists]
        xlabel = "share (mean probability over person images)"
    hidden = len(report["groups"]) - len(groups)
    return stacked_bars_png(
        f"{attribute} — job {report['job']}",
        labels,
        shares,
        classes,
        MST_COLOURS if attribute == "skin_tone" else TAB10,
        xlabel=xlabel,
        legend_title="Monk skin tone" if attribute == "skin_tone" else None,
        empty_label="no images with a person",
        note=f"{hidden} more groups are in bias.json and bias.md" if hidden > 0 else None,
    )


def write_bias_report(
    records: Iterable[Item], storage: Any, job: str, config: BiasSpec | None = None, prefix: str = REPORT_PREFIX
) -> dict[str, str]:
    """Compute the report from ``records`` and write ``{prefix}/bias.md``, ``bias.json`` and ``bias_<attr>.png``
    through ``storage`` (a ``pipeline.storage.Storage``; an empty ``prefix`` writes at its root). Returns name → URL
    of each file written."""
    report = compute_bias_report(records, job, config)
    files: dict[str, bytes] = {
        "bias.json": json.dumps(report, indent=2, sort_keys=True).encode(),
        "bias.md": render_markdown(report).encode(),
    }
    for attribute in ["person", *report["config"]["attributes"]]:
        files[f"bias_{attribute}.png"] = render_plot(report, attribute)
    return {name: storage.write_atomic(f"{prefix}/{name}" if prefix else name, data) for name, data in files.items()}
