"""What every command shares: its config, read from the file named and the ``--set a.b=v`` overrides."""

from __future__ import annotations

import argparse

from raggen.config import RaggenConfig, load_config, with_absolute_paths


def config_from_args(args: argparse.Namespace) -> RaggenConfig:
    return with_absolute_paths(load_config(getattr(args, "config", None), getattr(args, "set", None) or []))
