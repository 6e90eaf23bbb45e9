"""Sharded FAISS indexes: build one (shard.py); the published contract (manifest.py) with publish
(publish.py), the LATEST pointer (latest.py), verify/load (loading.py), the S3 cache
(version_cache.py) and passage parquet (passage_table.py); search (sharded.py over
shard_searcher.py, per-call knobs in search_params.py), shard actors (actors.py: the group;
shard_server.py: each actor; actor_backend.py: the callers' requests), hot swap (hot_swap.py) and
shared groups (shared_groups.py); search settings (settings.py), build settings (build_settings.py), search defaults from a recall target
(tuning.py); encode with Ray Data (encode.py: shard_split.py, passage_tokens.py,
encoder_actor.py, work_dir.py), the shard files (shard_files.py), the end-to-end build (build.py)
and opening a version for search (open_search.py).

Names load on first use (PEP 562): a shard actor imports ``raggen.index.shard_server`` and must not pay
for torch and transformers (which the encoding modules import) in its memory and start-up; nothing
here imports Ray or starts anything.
"""

from __future__ import annotations

from raggen.lazy import lazy_exports

_HOMES = {
    "ShardActor": "shard_server",
    "ShardActorGroup": "actors",
    "ShardServer": "shard_server",
    "build_index": "build",
    "IndexBuildSettings": "build_settings",
    "encode_passages": "encode",
    "PassageEncoderActor": "encoder_actor",
    "SwappableIndex": "hot_swap",
    "advance_latest": "latest",
    "list_versions": "latest",
    "read_latest": "latest",
    "LoadedShard": "loading",
    "LoadedVersion": "loading",
    "load_version": "loading",
    "read_manifest": "loading",
    "resolve_version_uri": "loading",
    "verify_index": "loading",
    "verify_version": "loading",
    "EncoderInfo": "manifest",
    "Manifest": "manifest",
    "SearchDefaults": "manifest",
    "ShardEntry": "manifest",
    "make_manifest": "manifest",
    "new_version_name": "manifest",
    "shard_file_names": "manifest",
    "open_index": "open_search",
    "read_passages_dataset": "passage_source",
    "embeddings_of": "passage_table",
    "passages_table": "passage_table",
    "write_parquet_atomic": "passage_table",
    "publish_index": "publish",
    "publish_version": "publish",
    "set_latest": "publish",
    "SearchSettings": "settings",
    "SearchParams": "search_params",
    "build_shard_index": "shard",
    "deserialize_index": "shard",
    "new_index": "shard",
    "normalize_metric": "shard",
    "reconstruct": "shard",
    "search": "shard",
    "serialize_index": "shard",
    "set_search_params": "shard",
    "train_index": "shard",
    "build_shard_files": "shard_files",
    "ShardSearcher": "shard_searcher",
    "SearchResult": "sharded",
    "ShardedIndex": "sharded",
    "merge_topk": "sharded",
    "EncodedCorpus": "work_dir",
    "EncodedShard": "work_dir",
}

__all__ = [
    "EncodedCorpus", "EncodedShard", "EncoderInfo", "IndexBuildSettings", "LoadedShard", "LoadedVersion", "Manifest",
    "PassageEncoderActor", "SearchDefaults", "SearchParams", "SearchResult", "SearchSettings", "ShardActor", "ShardActorGroup",
    "ShardEntry", "ShardSearcher", "ShardServer", "ShardedIndex", "SwappableIndex",
    "advance_latest", "build_index", "build_shard_files", "build_shard_index", "deserialize_index", "embeddings_of",
    "encode_passages", "list_versions", "load_version", "make_manifest", "merge_topk", "new_index",
    "new_version_name", "normalize_metric", "open_index", "passages_table", "publish_index", "publish_version",
    "read_latest", "read_manifest", "resolve_version_uri", "read_passages_dataset", "reconstruct", "search",
    "serialize_index", "set_latest", "set_search_params", "shard_file_names", "train_index", "verify_index",
    "verify_version", "write_parquet_atomic",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
