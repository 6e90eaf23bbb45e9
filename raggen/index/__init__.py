"""Sharded FAISS indexes: build one (shard.py); the published contract (manifest.py) with publish
(publish.py), the LATEST pointer (latest.py), verify/load (loading.py), the S3 cache
(version_cache.py) and passage parquet (passage_table.py); search (sharded.py over
shard_searcher.py), shard actors (actors.py), hot swap (hot_swap.py) and shared groups
(shared_groups.py); search settings (settings.py), build settings (build_settings.py), search defaults from a recall target
(tuning.py); encode with Ray Data (encode.py: shard_split.py, passage_tokens.py,
encoder_actor.py, work_dir.py), the shard files (shard_files.py), the end-to-end build (build.py)
and opening a version for search (open_search.py).

Importing this package does not import Ray or start anything; encode/build/actors import Ray lazily.
"""

from raggen.index.actors import ShardActor, ShardActorGroup, ShardServer
from raggen.index.build import build_index
from raggen.index.build_settings import IndexBuildSettings
from raggen.index.encode import encode_passages
from raggen.index.encoder_actor import PassageEncoderActor
from raggen.index.hot_swap import SwappableIndex
from raggen.index.latest import advance_latest, list_versions, read_latest
from raggen.index.loading import (
    LoadedShard,
    LoadedVersion,
    load_version,
    read_manifest,
    resolve_version_uri,
    verify_index,
    verify_version,
)
from raggen.index.manifest import (
    EncoderInfo,
    Manifest,
    SearchDefaults,
    ShardEntry,
    make_manifest,
    new_version_name,
    shard_file_names,
)
from raggen.index.open_search import open_index
from raggen.index.passage_source import read_passages_dataset
from raggen.index.passage_table import embeddings_of, passages_table, write_parquet_atomic
from raggen.index.publish import publish_index, publish_version, set_latest
from raggen.index.settings import SearchSettings
from raggen.index.shard import (
    build_shard_index,
    deserialize_index,
    new_index,
    normalize_metric,
    reconstruct,
    search,
    serialize_index,
    set_search_params,
    train_index,
)
from raggen.index.shard_files import build_shard_files
from raggen.index.shard_searcher import ShardSearcher
from raggen.index.sharded import SearchResult, ShardedIndex, merge_topk
from raggen.index.work_dir import EncodedCorpus, EncodedShard

__all__ = [
    "EncodedCorpus", "EncodedShard", "EncoderInfo", "IndexBuildSettings", "LoadedShard", "LoadedVersion", "Manifest",
    "PassageEncoderActor", "SearchDefaults", "SearchResult", "SearchSettings", "ShardActor", "ShardActorGroup",
    "ShardEntry", "ShardSearcher", "ShardServer", "ShardedIndex", "SwappableIndex",
    "advance_latest", "build_index", "build_shard_files", "build_shard_index", "deserialize_index", "embeddings_of",
    "encode_passages", "list_versions", "load_version", "make_manifest", "merge_topk", "new_index",
    "new_version_name", "normalize_metric", "open_index", "passages_table", "publish_index", "publish_version",
    "read_latest", "read_manifest", "resolve_version_uri", "read_passages_dataset", "reconstruct", "search",
    "serialize_index", "set_latest", "set_search_params", "shard_file_names", "train_index", "verify_index",
    "verify_version", "write_parquet_atomic",
]  # fmt: skip
