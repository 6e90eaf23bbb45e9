"""Encode a passage corpus into a sharded FAISS index and publish it (a ``ray job submit`` entry point).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \\
        python jobs/encode.py configs/wiki-dpr-21m.yaml [--set index.num_actors=16]

takes the config's ``index`` section; without a config the same settings come from flags:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/encode.py --passages s3://my-bucket/psgs_w100.tsv --output s3://my-bucket/index \\
            --encoder facebook/dpr-ctx_encoder-single-nq-base --pooling cls --num-shards 16 \\
            --faiss-factory IVF65536,PQ64 --num-actors 8 --batch-size 512

Under ``ray job submit`` RAY_ADDRESS names the cluster and ``ray.init()`` connects to it; run
directly, a local Ray is started. Rerunning the same command resumes an interrupted encode (the
work dir keeps finished shards). Prints the published manifest as JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys

# flags that the config's index section replaces (the rest: where to work, which cluster)
INDEX_FLAGS = {
    "passages",
    "output",
    "passages_format",
    "encoder",
    "pooling",
    "max_length",
    "normalize",
    "passage_format",
    "query_prefix",
    "passage_prefix",
    "batch_size",
    "num_shards",
    "faiss_factory",
    "metric",
    "train_sample",
    "target_recall",
    "num_actors",
    "actor_num_cpus",
    "actor_num_gpus",
    "version",
    "s3_endpoint_url",
    "s3_region",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "config", nargs="?", default=None, help="raggen YAML config: its index section (then no index flags)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with CONFIG: override, e.g. index.num_shards=8"
    )
    p.add_argument("--passages", help="corpus file or folder: DPR .tsv, .jsonl or .parquet; path or s3://")
    p.add_argument("--output", help="index root (folder or s3://bucket/prefix); LATEST is written there")
    p.add_argument("--passages-format", default="auto", choices=["auto", "dpr", "tsv", "jsonl", "parquet"])
    p.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2", help="passage encoder id or path")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors (cosine; MiniLM was trained so)")
    p.add_argument("--passage-format", default=None, choices=["pair", "joined"], help="default: the model's own")
    p.add_argument(
        "--query-prefix", default=None, help="the model's query prompt, recorded for searchers (E5: 'query: ')"
    )
    p.add_argument("--passage-prefix", default="", help="the model's passage prompt (E5: 'passage: ')")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument(
        "--faiss-factory", default="Flat", help="any faiss.index_factory string, e.g. HNSW32 or IVF4096,PQ64"
    )
    p.add_argument("--metric", default="ip", choices=["ip", "l2"])
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.99,
        help="index.search.target_recall: the build tunes nprobe / efSearch / refine_k_factor to this "
        "share of the exhaustive search's recall@100 on held-out tuning queries",
    )
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--actor-num-cpus", type=float, default=1.0)
    p.add_argument("--actor-num-gpus", type=float, default=None, help="default: 1 per actor when the cluster has GPUs")
    p.add_argument("--no-embeddings", action="store_true", help="do not store passage embeddings in the parquet")
    p.add_argument("--version", default=None, help="version name (default: v<UTC time>-<random>)")
    p.add_argument("--work-dir", default=None, help="resumable work dir (default: derived from the arguments)")
    p.add_argument(
        "--split-uri",
        default=None,
        help="where Ray Data writes the per-shard split; shared storage "
        "(e.g. s3://bucket/tmp/split) on multi-node clusters (default: inside the work dir)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL / AWS config)")
    p.add_argument("--s3-region", default=None)
    args = p.parse_args(argv)
    given = sorted(d for d in INDEX_FLAGS if getattr(args, d) != p.get_default(d))
    if args.config and given:
        p.error(
            f"with CONFIG the index section sets {', '.join('--' + g.replace('_', '-') for g in given)}: "
            "use --set index.FIELD=VALUE"
        )
    if not args.config and not (args.passages and args.output):
        p.error("--passages and --output are required without a CONFIG")
    if args.set and not args.config:
        p.error("--set needs a CONFIG")
    return args


def index_config(args: argparse.Namespace):
    """CONFIG mode: the validated config (paths absolute) whose ``index`` section is built;
    ``--no-embeddings`` overrides ``index.store_embeddings`` (else the config rules, true by default)."""
    from raggen.config import load_config, with_absolute_paths

    cfg = with_absolute_paths(load_config(args.config, args.set))
    if args.no_embeddings:
        cfg.index.store_embeddings = False
    return cfg


def flag_settings(args: argparse.Namespace):
    """Flag mode: the encoder, build and search settings the flags name, as ``build_index`` takes them
    (``EncoderSpec``, ``IndexBuildSettings``, ``SearchSettings``); a bad value is a ConfigError naming the field."""
    from pydantic import ValidationError

    from raggen.config import format_validation_error
    from raggen.errors import ConfigError
    from raggen.index.build_settings import IndexBuildSettings
    from raggen.index.settings import SearchSettings
    from raggen.models.retriever import EncoderSpec

    try:
        encoder = EncoderSpec(name_or_path=args.encoder, pooling=args.pooling, max_length=args.max_length,
                              normalize=args.normalize, passage_format=args.passage_format,
                              query_prefix=args.query_prefix, passage_prefix=args.passage_prefix)  # fmt: skip
        settings = IndexBuildSettings(
            batch_size=args.batch_size, num_shards=args.num_shards, faiss_factory=args.faiss_factory,
            metric=args.metric, train_sample=args.train_sample, num_actors=args.num_actors,
            actor_num_cpus=args.actor_num_cpus, actor_num_gpus=args.actor_num_gpus,
            store_embeddings=not args.no_embeddings,
        )  # fmt: skip
        search = SearchSettings(target_recall=args.target_recall)
    except ValidationError as e:
        raise ConfigError(format_validation_error("flags", e)) from None
    return encoder, settings, search


def flag_s3_options(args: argparse.Namespace) -> dict | None:
    s3 = {k: v for k, v in {"endpoint_url": args.s3_endpoint_url, "region_name": args.s3_region}.items() if v}
    return s3 or None


def build(args: argparse.Namespace):
    """The config's index section (or the flags' settings) built and published; config and flag
    errors are reported before Ray starts."""
    from raggen.index import build_index
    from raggen.ray_utils import ensure_ray

    if args.config:
        from raggen.app.indexing import build_index_from_config

        return build_index_from_config(
            index_config(args), address=args.address, work_dir=args.work_dir, split_uri=args.split_uri
        )
    encoder, settings, search = flag_settings(args)
    ensure_ray(address=args.address)
    return build_index(
        args.passages, args.output, encoder=encoder, settings=settings, search=search, passages_format=args.passages_format,
        version=args.version, s3_options=flag_s3_options(args), work_dir=args.work_dir, split_uri=args.split_uri,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    from raggen.cli import run_job

    return run_job("", lambda: build(args), lambda manifest: manifest.to_json())


if __name__ == "__main__":
    sys.exit(main())
