"""``raggen eval``: a config's models (or a checkpoint's) over its index and QA split."""

from __future__ import annotations

from raggen.app.training import s3_options
from raggen.train.evaluate import evaluate_rag, local_checkpoint, progress_bar, split_examples


def evaluate_from_config(
    cfg,
    checkpoint: str | None = None,
    split: str = "test",
    *,
    qa: str | None = None,
    limit: int | None = None,
    out: str | None = None,
) -> dict[str, float]:
    """``raggen eval``: models from a checkpoint folder (e.g. ``runs/NAME/final``) or the config,
    the config's index, ``limit`` (default ``train.eval_examples``) examples of the split, or of the
    QA file ``qa`` instead (the user's own questions: DPR ``.qa.csv`` or JSONL, a path or s3://);
    ``out`` (a path or s3:// URI) gets one JSON line per question (``raggen.train.retrieve.write_jsonl``)."""
    from raggen.app.training import check_trained_models
    from raggen.index import open_index
    from raggen.models.build import build_models
    from raggen.train.checkpointing import read_checkpoint

    t = cfg.train
    if checkpoint is None:  # the config's models: a path that cannot load is named before any loads
        check_trained_models(cfg)
    examples = split_examples(  # a missing or empty QA file is said before models load and Ray starts
        split,
        dev_file=t.dev_file,
        world_dir=cfg.world.out_dir,
        qa_file=qa,
        limit=limit or t.eval_examples,
        s3_options=s3_options(t.s3),
    )
    with local_checkpoint(checkpoint, s3_options(t.s3)) as folder:
        restored = read_checkpoint(folder).model_dirs if folder else None
        models = build_models(cfg.model, t.estimator, restored)
    for m in models.values():
        m.eval()
    from raggen.retrieval import with_retrieval

    index = open_index(
        t.index, settings=cfg.index.search, s3_options=s3_options(t.s3), load_embeddings=False, start_ray=True
    )  # shard actors for a large index (index.search.mode)
    index = with_retrieval(index, t.index, cfg.retrieval, s3_options=s3_options(t.s3))  # retrieval.mode
    records: list | None = [] if out else None
    gumbel = t.estimator == "gumbel-rerank"
    decoding = "rag-token" if t.estimator == "rag-token" else "rag-sequence-fast"
    try:
        with progress_bar(len(examples), f"eval {qa or split}") as bar:
            scores = evaluate_rag(
                examples,
                query_encoder=models["query_encoder"],
                generator=models["generator"],
                index=index,
                top_k=t.gumbel.k if gumbel else t.top_k,
                decoding=decoding,
                reranker=models.get("reranker"),
                rerank_candidates=t.gumbel.candidates if gumbel else None,
                progress=bar.update,
                records=records,
            )
    finally:
        index.close()  # ends the shard actors it started, if any
    if out:
        from raggen.train.retrieve import write_jsonl

        write_jsonl(out, records, s3_options(t.s3))
    return {
        "split": None if qa else split,
        "qa": qa,
        "checkpoint": checkpoint,
        "index_version": index.version,
        **scores,
    }
