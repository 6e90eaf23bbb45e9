"""How ``build_index`` encodes a corpus and builds its shards, declared once: the config's ``index``
section *is* this class (it inherits it), so a field is typed, defaulted, documented and validated
here and nowhere else; the application layer hands the validated object to ``build_index``.

The encoder travels as ``raggen.models.retriever.EncoderSpec`` and the build-time tuning of the
search defaults as ``raggen.index.settings.SearchSettings`` (``target_recall``, ``tune_queries``,
``tune_k``); what changes per call (corpus, output root, version, work dir) stays a keyword argument.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IndexBuildSettings(BaseModel):
    """``raggen.index.build_index``'s settings; every default runs on a CPU laptop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(64, ge=1, description="passages per encoder batch (Ray Data batch size)")
    num_shards: int = Field(2, ge=1, description="FAISS shards; a passage's shard is crc32(passage id) % num_shards")
    faiss_factory: str = Field("Flat", description="any faiss.index_factory string, e.g. HNSW32 or IVF4096,PQ64")
    metric: Literal["ip", "l2"] = Field("ip", description="inner product or L2 distance")
    train_sample: int = Field(
        100_000, ge=1, description="vectors drawn from all shards to train the one shared quantizer (IVF, PQ)"
    )
    num_actors: int | None = Field(
        None,
        ge=1,
        description="encoder actors; null: sized from the cluster's free resources (GPU actors: one per GPU; "
        "CPU actors: CPUs // actor_num_cpus - 1)",
    )
    actor_num_cpus: float = Field(1.0, gt=0, description="each encoder actor's CPUs (and its torch threads)")
    actor_num_gpus: float | None = Field(
        0.0, ge=0, description="each encoder actor's GPUs; null: 1 per actor when the cluster has GPUs (0: CPUs)"
    )
    build_num_cpus: float = Field(1.0, gt=0, description="each FAISS training / shard-building Ray task's CPUs")
    work_dir_shared: bool = Field(
        False,
        description="the build's work dir is on a filesystem all nodes mount: its tasks may run anywhere "
        "(else they are pinned to the driver's node)",
    )
    store_embeddings: bool = Field(
        True,
        description="the passages' vectors in the version's parquet: training reads them (q(x).d(z) with exact "
        "d(z)); a serving-only copy may leave them out (Serve never loads them)",
    )
    sparse: Literal["bm25"] | None = Field(
        None, description="bm25: a BM25 index beside the shards, in the same version (null: none)"
    )
