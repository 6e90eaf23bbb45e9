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

from raggen.cli import run_job
from raggen.config import load_config, with_absolute_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work():
        from raggen.app.training import run_training

        # relative paths (model.generator: raggen/assets/reader) resolve against the job's working
        # dir here, on the driver, as `raggen train` does: Train workers start elsewhere
        return run_training(with_absolute_paths(load_config(args.config, args.set)))

    return run_job("train: ", work, lambda summary: json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
