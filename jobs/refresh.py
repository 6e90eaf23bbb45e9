"""Refresh a published index with a trained passage encoder (a ``ray job submit`` entry point).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \\
        python jobs/refresh.py configs/wiki-dpr-21m.yaml --encoder s3://my-rag-bucket/runs/wiki-dpr-jsa/final

re-encodes the config's corpus (``index.passages``; documents are chunked first) with the
checkpoint's ``passage_encoder/`` (a shared-encoder run: its ``query_encoder/``; or any encoder id
or folder), publishes a new version under ``index.output`` and moves LATEST there: a service with
``serve.watch_latest`` switches to it. Submitting the same command again after a failure resumes it
(only unfinished shards are encoded again; ``--work-dir`` on a persistent volume keeps the work
across clusters). Prints the published manifest as JSON; config errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (see configs/): its index section")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. index.num_actors=16"
    )
    parser.add_argument(
        "--encoder",
        required=True,
        metavar="CHECKPOINT_OR_ID",
        help="training checkpoint (folder or s3://.../final) or encoder id/folder",
    )
    parser.add_argument(
        "--encoder-role",
        default="auto",
        choices=["auto", "passage", "query"],
        help="which encoder of a checkpoint (auto: passage_encoder/, else a shared run's query_encoder/)",
    )
    parser.add_argument("--version", default=None, help="name of the new version (default: a fresh one)")
    parser.add_argument("--work-dir", default=None, help="resumable work dir (default: derived from the arguments)")
    parser.add_argument(
        "--split-uri",
        default=None,
        help="where Ray Data writes the per-shard split: shared "
        "storage (e.g. s3://bucket/tmp/split) on multi-node clusters (default: inside the work dir)",
    )
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from raggen.app.indexing import refresh_index_from_config
    from raggen.cli import run_job
    from raggen.config import load_config, with_absolute_paths

    def work():
        # relative paths resolve here, on the driver, as `raggen index refresh` does
        cfg = with_absolute_paths(load_config(args.config, args.set))
        manifest, _ = refresh_index_from_config(
            cfg,
            args.encoder,
            role=args.encoder_role,
            version=args.version,
            work_dir=args.work_dir,
            split_uri=args.split_uri,
            address=args.address,
        )
        return manifest

    return run_job("refresh: ", work, lambda manifest: manifest.to_json())


if __name__ == "__main__":
    sys.exit(main())
