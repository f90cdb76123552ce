"""The ``genpipe`` command line. User errors print one line (and the list of problems) and exit non-zero;
tracebacks are for bugs only."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable

from pipeline.errors import GenpipeError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SPEC = os.path.join(REPO_ROOT, "jobs", "demo", "spec.yaml")


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec
    from pipeline.runner import plan_job, run_job

    spec = load_spec(args.spec, args.set)
    summary = plan_job(spec) if args.dry_run else run_job(spec, quiet=args.quiet)
    print(summary.render())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec
    from pipeline.manifest import ManifestPlanner, read_rows
    from pipeline.runner import check_spec
    from pipeline.scoring.screen import PromptScreen
    from schemas.manifest import KNOWN_COLUMNS

    spec = load_spec(args.spec, args.set)
    _, traits = check_spec(spec)
    planner = ManifestPlanner(spec)
    screen = PromptScreen.from_spec(spec)
    rows = bad = items = blocked = held = 0
    seen_columns: set[str] = set()
    for row_number, raw in read_rows(spec.manifest):
        outcome = planner.plan_row(row_number, raw)
        rows += 1
        for column in sorted(set(raw) - set(KNOWN_COLUMNS) - seen_columns):  # a typo lands in metadata, unused
            seen_columns.add(column)
            if close := difflib.get_close_matches(column, KNOWN_COLUMNS, n=1, cutoff=0.75):
                print(f"column {column!r}: not a manifest column genpipe reads (kept as metadata); did you mean "
                      f"{close[0]!r}?")  # fmt: skip
        problems = list(outcome.problems)
        if not problems:  # what this model allows (samples of a row share their settings)
            first = outcome.items[0]
            problems = traits.row_problems(first.sampler, first.width, first.height, first.negative_prompt)
        if problems:
            bad += 1
            for p in problems:
                print(f"row {row_number} (prompt_id {outcome.prompt_id!r}): {p}")
            continue
        if screen is not None:
            screen.screen(outcome.items[:1])  # samples of a row share its prompt
            if outcome.items[0].status == "blocked":
                blocked += 1
                rules = ", ".join(r.get("rule", r["code"]) for r in outcome.items[0].reasons)
                print(f"row {row_number} (prompt_id {outcome.prompt_id!r}): blocked by the prompt screen ({rules})")
                continue
            if outcome.items[0].decision == "review":
                held += len(outcome.items)
                rules = ", ".join(r.get("rule", r["code"]) for r in outcome.items[0].reasons)
                print(f"row {row_number} (prompt_id {outcome.prompt_id!r}): generated, then held for review by the "
                      f"prompt screen ({rules})")  # fmt: skip
        items += len(outcome.items)
    tail = f" ({held} of them held for review by the prompt screen)" if held else ""
    print(f"spec {args.spec}: valid; manifest {spec.manifest}: {rows} rows, {bad} rejected, {blocked} blocked, "
          f"{items} images to generate{tail}")  # fmt: skip
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec
    from pipeline.runner import run_job

    spec = load_spec(DEMO_SPEC, args.set)
    if (
        not os.path.isabs(spec.manifest)
        and "://" not in spec.manifest
        and not any(s.split("=", 1)[0].strip() == "manifest" for s in args.set)
    ):  # the bundled manifest, from any directory (the output, ./runs/demo, stays where genpipe runs)
        spec = spec.model_copy(update={"manifest": os.path.join(REPO_ROOT, spec.manifest)})
    summary = run_job(spec, quiet=args.quiet)
    print(summary.render())
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.models.tiny import build_tiny, ensure_tiny

    paths = build_tiny(Path(args.dir)) if args.dir else ensure_tiny()
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genpipe", description="Batch text-to-image generation with content safety and a per-image audit trail."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a spec field (repeatable), e.g. --set resources.batch_size=8")  # fmt: skip

    p = add("run", _cmd_run, "run a job locally or on the Ray cluster in RAY_ADDRESS")
    p.add_argument("spec", help="job spec YAML (path or fsspec URL)")
    add_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: validate, expand, screen and resume-check the manifest, print what would run, "
                        "write nothing")  # fmt: skip

    p = add("validate", _cmd_validate, "validate a spec and its manifest without generating")
    p.add_argument("spec")
    add_set(p)

    p = add("demo", _cmd_demo, "run the bundled demo job: tiny offline model, local Ray, SQLite, ./runs/demo")
    add_set(p)
    p.add_argument("--quiet", action="store_true")

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("build-tiny", help="build the tiny offline SD pipeline and open_clip model")
    p.add_argument("dir", nargs="?", help="output directory (default: the cache, ~/.cache/genpipe)")
    p.set_defaults(fn=_cmd_build_tiny)

    from pipeline.audit.cli import register as register_audit  # audit migrate | verify | query | export | ...

    register_audit(sub)
    from pipeline.train.cli import register as register_train  # train-lora

    register_train(sub)
    from pipeline.cluster.cli import register as register_cluster  # submit | status | logs | stop

    register_cluster(sub)
    from pipeline.report.cli import register as register_report  # report bias

    register_report(sub)
    from pipeline.review.cli import register as register_review  # review serve | add-reviewer

    register_review(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except GenpipeError as exc:
        print(f"genpipe: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("genpipe: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
