"""``genpipe train-lora SPEC [--set key=value ...]``: LoRA fine-tuning; registered by ``pipeline.cli``."""

from __future__ import annotations

import argparse


def _cmd_train_lora(args: argparse.Namespace) -> int:
    from pipeline.train.runner import load_train_spec, train_lora

    spec = load_train_spec(args.spec, args.set)
    summary = train_lora(spec, quiet=args.quiet)
    print(summary.render())
    return 0


def register(sub) -> None:
    """Add ``train-lora`` to the ``genpipe`` sub-commands."""
    help_ = "LoRA fine-tuning on captioned images (Ray Train or one process); a rerun resumes"
    p = sub.add_parser("train-lora", help=help_, description=help_)
    p.add_argument("spec", help="training spec YAML (path or fsspec URL), e.g. jobs/train/spec.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable), e.g. --set max_steps=200")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(fn=_cmd_train_lora)
