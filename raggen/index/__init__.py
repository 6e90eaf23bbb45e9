"""Sharded FAISS indexes: build (shard.py), publish/verify/load (manifest.py), search (sharded.py),
shard actors and hot swap (actors.py), search settings (settings.py), search defaults from a recall
target (tuning.py), encode with Ray Data (encode.py) and the end-to-end build (build.py).

Importing this package does not import Ray or start anything; encode/build/actors import Ray lazily.
"""

from raggen.index.actors import ShardActor, ShardActorGroup, ShardServer, SwappableIndex
from raggen.index.build import (
    build_index,
    build_shard_files,
    open_index,
    publish_index,
    search_index,
    verify_index,
)
from raggen.index.encode import (
    EncodedCorpus,
    EncodedShard,
    PassageEncoderActor,
    encode_passages,
    read_passages_dataset,
)
from raggen.index.manifest import (
    EncoderInfo,
    LoadedShard,
    LoadedVersion,
    Manifest,
    SearchDefaults,
    ShardEntry,
    advance_latest,
    embeddings_of,
    list_versions,
    load_version,
    make_manifest,
    new_version_name,
    passages_table,
    publish_version,
    read_latest,
    read_manifest,
    resolve_version_uri,
    set_latest,
    shard_file_names,
    verify_version,
    write_parquet_atomic,
)
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
from raggen.index.sharded import SearchResult, ShardedIndex, ShardSearcher, merge_topk

__all__ = [
    "EncodedCorpus", "EncodedShard", "EncoderInfo", "LoadedShard", "LoadedVersion", "Manifest",
    "PassageEncoderActor", "SearchDefaults", "SearchResult", "SearchSettings", "ShardActor", "ShardActorGroup",
    "ShardEntry", "ShardSearcher", "ShardServer", "ShardedIndex", "SwappableIndex",
    "advance_latest", "build_index", "build_shard_files", "build_shard_index", "deserialize_index", "embeddings_of",
    "encode_passages", "list_versions", "load_version", "make_manifest", "merge_topk", "new_index",
    "new_version_name", "normalize_metric", "open_index", "passages_table", "publish_index", "publish_version",
    "read_latest", "read_manifest", "resolve_version_uri", "read_passages_dataset", "reconstruct", "search", "search_index",
    "serialize_index", "set_latest", "set_search_params", "shard_file_names", "train_index", "verify_index",
    "verify_version", "write_parquet_atomic",
]  # fmt: skip
