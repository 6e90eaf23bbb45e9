"""``raggen index ...``: build, refresh, search, verify, publish, list, set-latest and rm of sharded indexes."""

from __future__ import annotations

import argparse

from raggen.cli.config_args import config_from_args


def cmd_index_build(args: argparse.Namespace) -> None:
    from raggen.app.indexing import build_index_from_config

    cfg = config_from_args(args)
    # a bad factory or an existing version fails before documents are chunked or anything is encoded
    manifest = build_index_from_config(cfg)
    print(
        f"published {cfg.index.output} version {manifest.version}: {manifest.num_passages} passages in {len(manifest.shards)} shards"
    )


def cmd_index_refresh(args: argparse.Namespace) -> None:
    """Re-encode index.passages with a trained (or any) passage encoder; a new version, LATEST moved."""
    from raggen.app.indexing import refresh_index_from_config

    cfg = config_from_args(args)
    manifest, encoder = refresh_index_from_config(
        cfg, args.encoder, role=args.encoder_role, version=args.version, work_dir=args.work_dir
    )
    print(
        f"published {cfg.index.output} version {manifest.version} (LATEST) encoded with {encoder.name_or_path}: "
        f"{manifest.num_passages} passages in {len(manifest.shards)} shards"
    )


def cmd_index_search(args: argparse.Namespace) -> None:
    from raggen.retrieval.search import search_index

    cfg = config_from_args(args)
    # the manifest's encoder, pooling, normalisation and query prompt unless --encoder / --pooling / --query-prefix
    result = search_index(
        args.uri,
        [args.question],
        k=args.k,
        encoder_name_or_path=args.encoder,
        pooling=args.pooling,
        query_prefix=args.query_prefix,
        max_length=cfg.index.encoder.max_length,
        s3_options=cfg.index.s3.storage_options(),
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        refine_k_factor=args.refine_k_factor,
        settings=cfg.index.search,
        start_ray=True,
    )
    for rank, (pid, score, title, text) in enumerate(
        zip(result.ids[0], result.scores[0], result.titles[0], result.texts[0]), 1
    ):
        print(f"{rank:>2}. [{score:.3f}] {pid} {title}: {text[:120]}")


def cmd_index_verify(args: argparse.Namespace) -> None:
    from raggen.index import verify_index

    # every file is hashed as it streams from the store named (a local cache is never trusted)
    manifest = verify_index(
        args.uri, version=args.version, s3_options=config_from_args(args).index.s3.storage_options()
    )
    print(
        f"ok: {args.uri} version {manifest.version}, {manifest.num_passages} passages, {len(manifest.shards)} shards, all checksums match"
    )


def cmd_index_publish(args: argparse.Namespace) -> None:
    from raggen.index import publish_index, read_latest

    s3 = config_from_args(args).index.s3.storage_options()
    manifest = publish_index(args.src, args.dst, s3_options=s3, rollback=args.rollback)
    latest = read_latest(args.dst, s3)
    moved = (
        "LATEST now names it"
        if latest == manifest.version
        else f"LATEST stays at the newer {latest} (--rollback moves it back)"
    )
    print(f"published {args.dst} version {manifest.version}; {moved}")


def cmd_index_list(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import format_versions, list_index

    s3 = config_from_args(args).index.s3.storage_options()
    print(format_versions(args.uri, list_index(args.uri, s3_options=s3), as_json=args.json))


def cmd_index_set_latest(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import set_latest_version

    s3 = config_from_args(args).index.s3.storage_options()
    manifest = set_latest_version(args.uri, args.version, rollback=args.rollback, s3_options=s3)
    print(
        f"LATEST under {args.uri} now names {manifest.version} (verified: {manifest.num_passages} passages, "
        f"{len(manifest.shards)} shards)"
    )


def cmd_index_rm(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import remove_version

    removed = remove_version(args.uri, args.version, s3_options=config_from_args(args).index.s3.storage_options())
    print(f"removed {args.uri} version {args.version} ({len(removed)} files)")
