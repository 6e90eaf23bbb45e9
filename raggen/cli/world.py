"""``raggen world``: write the embedded generated world."""

from __future__ import annotations

import argparse
import json

from raggen.cli.config_args import config_from_args


def cmd_world(args: argparse.Namespace) -> None:
    w = config_from_args(args).world
    from raggen.corpus.world import WorldConfig, write_world

    files = write_world(
        w.out_dir, WorldConfig(num_entities=w.num_entities, seed=w.seed, changed_fraction=w.changed_fraction)
    )
    print(json.dumps({k: str(v) for k, v in vars(files).items()}, indent=2))
