"""How a published index is searched: where (in this process or through shard actors), with which
FAISS search parameters, and how build-time tuning picks the version's defaults.

``SearchSettings`` is the library's own settings object; ``raggen.config`` embeds it as
``index.search`` (train and eval open ``train.index`` with it; the Serve Retriever opens its
index with it too, its replicas sharing one group of shard actors per version).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# mode "auto" serves a version through shard actors from this size on (either threshold)
AUTO_ACTORS_BYTES = 2 * 1024**3  # 2 GiB of shard files (.faiss + .parquet)
AUTO_ACTORS_PASSAGES = 1_000_000
#: build-time tuning: the cosine between a tuning query and the stored vector it is drawn from. Real
#: questions sit about this far from their best passage (MiniLM on real English text: median top-1
#: cosine 0.61); queries much nearer their source (cosine 0.995, the earlier 0.1 noise) find their
#: neighbours in the first lists probed and under-tune nprobe: IVF128,PQ48,RFlat tuned on them reached
#: recall@100 0.966 on real questions, tuned at 0.6 it reaches 0.990 (benchmarks/ann_quality.py).
QUERY_SIMILARITY = 0.6


class SearchSettings(BaseModel):
    """``index.search``: every field has one default that runs on a CPU laptop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # local: every caller loads the shards into its own process (small indexes, tests);
    # actors: one group of shard actors (placement group, SPREAD over nodes) that callers query
    # through handles; auto: actors from auto_actors_bytes of shard files or auto_actors_passages
    # passages on, local below
    mode: Literal["local", "actors", "auto"] = "auto"
    auto_actors_bytes: int = Field(AUTO_ACTORS_BYTES, ge=0)
    auto_actors_passages: int = Field(AUTO_ACTORS_PASSAGES, ge=0)
    actor_num_cpus: float = Field(1.0, gt=0)  # each shard actor's CPU share (its FAISS threads: max(1, int(it)))
    actor_num_gpus: float = Field(0.0, ge=0)
    # consecutive shards served by one actor. None (default): one actor per node that can hold one
    # (its total resources fit actor_num_cpus / actor_num_gpus), the shards split evenly over them,
    # counted when the group starts (on an autoscaling cluster, set it). One actor per shard would
    # claim num_shards bundles (an 8-shard index: 8 CPUs, never placed on a 2-CPU laptop), and every
    # actor wakes for every query: more actors than cores cost latency (scale rehearsal, 2 cores,
    # plain IVF-PQ: 2 actors 1.34-1.38x a local search, 4 actors 1.60-1.77x)
    shards_per_actor: int | None = Field(None, ge=1)
    actor_max_concurrency: int = Field(4, ge=1)  # requests one actor serves at once (FAISS releases the GIL)
    # small requests (at most 256 hits: serving's single queries, training steps) go to the actors over
    # an authenticated TCP socket of their own (~0.15 ms a round trip) instead of as Ray calls
    # (0.8-2.5 ms on 2 cores); Ray still starts, restarts and ends the actors and carries large
    # batches, and a failed direct call is sent again as a Ray call. false: Ray calls only (e.g. a
    # network that lets the nodes reach only Ray's own ports)
    direct_calls: bool = True
    # a caller (Serve replica, Train worker) copies the IVF quantizer that all the shards share, up to
    # this size, on its first small request and assigns each query's lists once for all actors
    # instead of once per actor (a 200k copy of the scale rehearsal, 4 actors on 2 cores: actor CPU
    # per query 1.43-1.49 -> 1.12-1.14 ms).
    # 64 MiB: IVF16384 at 768-d; the 21M recipe's IVF65536 quantizer is 192 MiB. 0: never copy
    caller_quantizer_max_bytes: int = Field(64 << 20, ge=0)
    # a shard actor whose process or node died is started again by Ray in its placement-group bundle
    # (it reloads its shards from its node's cache, or the store on a new node), at most
    # actor_max_restarts times (-1: always; 0: never, and every later search fails until the
    # version is started again). A search the dead actor held is sent again once it is back, at
    # most actor_search_retries times (searches only read), so callers see a slower answer, not an
    # error; the bound keeps a search that itself kills the actor from looping
    actor_max_restarts: int = Field(-1, ge=-1)
    actor_search_retries: int = Field(3, ge=0)
    # how a shard actor keeps its passages: "mapped" (texts as zstd blocks, stored vectors as .npy,
    # derived once per node into the cache, both read with pread: the actor
    # holds only what it reads; ~0.7x the parquet's bytes more on the cache disk) or "table"
    # (decoded into the actor's memory)
    actor_passages: Literal["mapped", "table"] = "mapped"
    # the same choice for a caller that searches in its own process (mode local): "mapped" lets the
    # processes of a node (Train workers, Serve replicas) share one page-cached copy instead of each
    # decoding the passages; "table" (default) keeps small indexes free of the cache files
    local_passages: Literal["mapped", "table"] = "table"
    # IVF lists probed / HNSW efSearch: None = the version's search_defaults (tuned at build time),
    # else FAISS's own (nprobe 1, efSearch 16); a per-call argument overrides both
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)
    refine_k_factor: float | None = Field(
        None,
        ge=1,
        description=(
            "re-ranked indexes ('IVF1024,PQ64,RFlat', '...,Refine(SQ8)'): the k x refine_k_factor "
            "candidates of the compressed search that are re-scored with the refine codes; None = the "
            "version's search_defaults (tuned at build time), else the index's own (FAISS: 1, i.e. only "
            "the k hits re-scored); a per-call argument overrides both"
        ),
    )
    # build time: the smallest nprobe / efSearch (powers of 2) whose recall@tune_k on tune_queries
    # held-out queries is within (1 - target_recall) of the exhaustive setting's, then (re-ranked
    # indexes) the smallest refine_k_factor that stays within it (raggen.index.tuning); None: no tuning
    target_recall: float | None = Field(0.99, gt=0, le=1)
    tune_queries: int = Field(200, ge=1)
    # each tuning query is a stored vector moved by noise to this cosine from it: about where a real
    # question is from its best passage (QUERY_SIMILARITY); nearer queries under-tune
    tune_query_similarity: float = Field(QUERY_SIMILARITY, gt=0, le=1)
    tune_k: int = Field(100, ge=1)
    # S3 versions are cached locally (memory-mapped from there); versions beyond the newest
    # cache_versions per root are evicted
    cache_versions: int = Field(2, ge=1)


def wants_actors(settings: SearchSettings, *, num_passages: int, shard_bytes: int | None) -> bool:
    """The mode a version is served in: "actors" or "local" as configured; "auto": actors when the
    version holds at least ``auto_actors_passages`` passages or ``auto_actors_bytes`` of shard files."""
    if settings.mode != "auto":
        return settings.mode == "actors"
    if num_passages >= settings.auto_actors_passages:
        return True
    return shard_bytes is not None and shard_bytes >= settings.auto_actors_bytes
