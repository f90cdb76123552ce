"""Loading a job spec: YAML file + ``--set key.path=value`` overrides → a validated ``JobSpec``.

Every problem is reported with its key path (``sampler.steps: Input should be less than or equal to 200``)
before anything launches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import SpecError
from pipeline.storage import open_input
from schemas.spec import JobSpec


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1, plus YAML 1.2's floats without a dot: 1.1 reads ``1e-4`` as the string "1e-4",
    which the strict spec types would refuse, and learning rates are written that way. A key given twice in one
    mapping is an error (YAML 1.2 says keys are unique; PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first at line {seen[key].line + 1})", key_node.start_mark,
                )  # fmt: skip
            if isinstance(key, Hashable):
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value); the value is read as YAML (so 8 is an int, true a bool)."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise SpecError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = yaml.load(raw, Loader=SpecLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {key}: value is not valid YAML: {exc}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
            node = child
        node[path[-1]] = value
    return data


def format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{loc}: {msg}")
    return out


def load_spec_data(path: str) -> dict[str, Any]:
    try:
        with open_input(path, "rt") as f:
            data = yaml.load(f, Loader=SpecLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise SpecError(f"spec {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {path}: not valid YAML: {exc}".replace("\n", " ")) from None
    except UnicodeDecodeError:
        raise SpecError(f"spec {path}: not a text file (a YAML spec is UTF-8 text; is this the manifest?)") from None
    except IsADirectoryError:
        raise SpecError(f"spec {path}: is a directory, not a YAML file") from None
    except (OSError, ValueError) as exc:  # fsspec: unknown protocol, unreachable store, permissions
        raise SpecError(f"spec {path}: cannot read: {type(exc).__name__}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"spec {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_spec(path: str | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> JobSpec:
    """Read, override and validate a spec. Raises ``SpecError`` carrying every problem."""
    data = copy.deepcopy(base or {})  # --set must never change the caller's nested dicts
    if path is not None:
        data.update(load_spec_data(path))
    data = apply_overrides(data, list(overrides))
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"spec {path or '(embedded)'} is invalid", problems=format_errors(err)) from None
