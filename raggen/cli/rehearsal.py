"""``raggen dry-run`` and ``quickstart``: the whole flow rehearsed on small models and data."""

from __future__ import annotations

import argparse
import json
import shlex

from raggen.cli.config_args import config_from_args


def set_lines(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` lines, shell-quoted where needed (``index.faiss_factory=IVF8,PQ64,Refine(SQfp16)``),
    so that they paste into the ordinary commands as they are."""
    return [f"--set {shlex.quote(line)}" for line in overrides]


def cmd_dry_run(args: argparse.Namespace) -> None:
    """Print the --set lines of the rehearsal, or run it (index -> train -> eval -> serve one question)."""
    from raggen.app.dry_run import dry_run_overrides, run_dry_run

    overrides = getattr(args, "set", None) or []
    if args.print_overrides:
        lines = dry_run_overrides(args.config, args.out, s3_endpoint=args.s3_endpoint, overrides=overrides)
        print("\n".join(set_lines(lines)))
        return
    report = run_dry_run(args.config, args.out, s3_endpoint=args.s3_endpoint, overrides=overrides)
    print(json.dumps(report, indent=2, default=str))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from raggen.app.quickstart import run_quickstart

    run_quickstart(config_from_args(args))
