"""Train end to end on a Ray cluster (the ``ray job submit`` entry point).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python jobs/train.py configs/wiki-dpr-21m.yaml --set train.steps=1000

Submitting it again with the same ``train.name`` and ``train.storage_path`` resumes the run from
its latest checkpoint. Prints the run summary as JSON; config errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raggen.config import load_config
from raggen.errors import RaggenError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from raggen.train.trainer import run_training

        summary = run_training(load_config(args.config, args.set))
    except RaggenError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
