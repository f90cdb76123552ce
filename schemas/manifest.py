"""The manifest row: one prompt, with optional per-row overrides of the spec.

``parse_row`` never raises: it returns either a ``ManifestRow`` or the list of problems, each naming the
column, so a bad row becomes a ``rejected`` record and the job goes on.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.limits import LIMITS, SAMPLER_NAMES
from schemas.spec import LoraSpec

PROMPT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

#: Columns with a meaning; any other column is carried into the record's ``metadata``.
KNOWN_COLUMNS = (
    "prompt_id", "prompt", "negative_prompt", "seed", "num_images", "width", "height", "steps",
    "guidance_scale", "sampler", "lora", "campaign", "sku", "locale", "tags",
)  # fmt: skip
OVERRIDE_COLUMNS = ("negative_prompt", "seed", "num_images", "width", "height", "steps", "guidance_scale",
                    "sampler", "lora")  # fmt: skip
#: Metadata keys genpipe writes itself (a regeneration try's links to its first and previous try): a manifest
#: column of that name would be read as such a link.
RESERVED_METADATA = ("attempt_of", "regenerated_from")


def _integral(v: Any, name: str) -> Any:
    """Ints pass; integral finite floats (Parquet int columns with nulls become float) become ints;
    NaN, infinities, fractions, booleans and strings are errors."""
    if v is None or isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite integer, got {v}")
        if v != int(v):
            raise ValueError(f"{name} must be an integer, got {v}")
        return int(v)
    raise ValueError(f"{name} must be an integer, got {type(v).__name__} {v!r}")


class ManifestRow(BaseModel):
    """A validated manifest row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_id: str = Field(description="1-128 chars of [A-Za-z0-9._-], unique in the manifest.")
    prompt: str = Field(description=f"Non-empty text, at most {LIMITS.max_prompt_chars} characters.")
    negative_prompt: str | None = Field(None, max_length=LIMITS.max_prompt_chars, description="What to avoid.")
    seed: int | None = Field(None, ge=0, le=LIMITS.max_seed, description="Base seed; sample k uses seed + k.")
    num_images: int | None = Field(None, ge=1, le=LIMITS.max_images_per_prompt, description="Samples.")
    width: int | None = Field(None, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description="Pixels.")
    height: int | None = Field(None, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description="Pixels.")
    steps: int | None = Field(None, ge=1, le=LIMITS.max_steps, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0.0, le=LIMITS.max_guidance, description="CFG scale.")
    sampler: str | None = Field(None, description="Sampler name (see the spec).")
    lora: tuple[LoraSpec, ...] | None = Field(None, description="Adapters for this row, replacing the spec's.")
    campaign: str | None = Field(None, max_length=256, description="Campaign label, for reports and queries.")
    sku: str | None = Field(None, max_length=256, description="Product SKU.")
    locale: str | None = Field(None, max_length=64, description="Locale, e.g. en-GB.")
    tags: tuple[str, ...] = Field((), description="Free labels.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Unknown columns, carried through.")

    @field_validator("prompt_id")
    @classmethod
    def _prompt_id(cls, v: str) -> str:
        if not PROMPT_ID_RE.fullmatch(v) or v in {".", ".."}:
            raise ValueError(f"must be 1-128 characters of [A-Za-z0-9._-] and not '.' or '..', got {v[:80]!r}")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty or whitespace")
        if len(v) > LIMITS.max_prompt_chars:
            raise ValueError(f"has {len(v)} characters; the limit is {LIMITS.max_prompt_chars}")
        return v

    @field_validator("seed", "num_images", "width", "height", "steps", mode="before")
    @classmethod
    def _ints(cls, v: Any, info) -> Any:
        return _integral(v, info.field_name)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int | float)):
            raise ValueError(f"must be a number, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str | None) -> str | None:
        if v is not None and v not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {v!r}; valid names: {', '.join(SAMPLER_NAMES)}")
        return v


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "row"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

#: A raw row's key for the problems of cells that could not be read (e.g. a timestamp past year 9999).
UNREADABLE = "\x00unreadable"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def parse_row(raw: dict[str, Any], allowed_overrides: tuple[str, ...] = OVERRIDE_COLUMNS) -> ManifestRow | list[str]:
    """Validate one raw row (column → Python value). Returns the row, or a list of problems."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        if key in KNOWN_COLUMNS:
            if value is None:
                continue
            if key in OVERRIDE_COLUMNS and key not in allowed_overrides:
                problems.append(f"{key}: this job's spec does not allow rows to override it")
                continue
            data[key] = value
        elif key == UNREADABLE:
            problems.extend(value)  # cells the reader could not convert (see pipeline.manifest.read_rows)
        elif key in RESERVED_METADATA:
            problems.append(f"{key}: a column name genpipe reserves for regeneration links; rename the column")
        else:
            # JSON has no NaN; a missing value in a pass-through column is recorded as null, also inside lists
            # and structs.
            metadata[key] = _json_safe(value)
    for key, value in raw.items():
        # Control characters have no place in prompts or labels (an ANSI escape would rewrite a reviewer's
        # terminal), and NUL cannot be stored in PostgreSQL. Tabs and line breaks are text.
        if isinstance(value, str) and (bad := _CONTROL.search(value)):
            char = bad.group()
            problems.append(f"{key}: contains a NUL character" if char == "\x00" else
                            f"{key}: contains the control character U+{ord(char):04X}")  # fmt: skip
            data.pop(key, None)
            metadata.pop(key, None)
    for required in ("prompt_id", "prompt"):
        if required not in data and not any(p.startswith(f"{required}:") for p in problems):
            problems.append(f"{required}: missing")
    for text in ("prompt_id", "prompt", "negative_prompt", "sampler", "campaign", "sku", "locale"):
        if text in data and not isinstance(data[text], str):
            problems.append(f"{text}: must be text, got {type(data[text]).__name__}")
            data.pop(text)
    if "tags" in data:
        tags = data["tags"]
        if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
            problems.append("tags: must be a list of strings")
            data.pop("tags")
    if "lora" in data and isinstance(data["lora"], str):
        data["lora"] = [{"path": data["lora"]}]
    elif isinstance(data.get("lora"), list | tuple):  # Parquet structs give every field; an unset one is null
        data["lora"] = [{k: v for k, v in a.items() if v is not None} if isinstance(a, dict) else a
                        for a in data["lora"]]  # fmt: skip
    data["metadata"] = metadata
    try:
        row = ManifestRow.model_validate(data)
    except ValidationError as err:
        problems.extend(p for p in _problems(err) if not any(p.startswith(q.split(":")[0] + ":") for q in problems))
    if problems:
        return problems
    return row
