"""``raggen retrieve``: DPR's retrieval-results JSON for a QA file, from a config's index and query encoder."""

from __future__ import annotations

from raggen.errors import ConfigError
from raggen.train.retrieve import retrieve_results


def load_query_encoder(cfg, checkpoint: str | None, s3_options=None):
    """``model.query_encoder``, or a checkpoint's ``query_encoder/`` (local or s3://) when it has one."""
    from raggen.app.indexing import read_checkpoint_state
    from raggen.models.loading import check_model_reference, fetch_model_dir

    spec = cfg.model.query_encoder
    path = spec.name_or_path
    if not checkpoint:
        check_model_reference("model.query_encoder.name_or_path", path)
    else:
        state = read_checkpoint_state(checkpoint, s3_options)
        if state is None:
            raise ConfigError(f"--checkpoint {checkpoint}: not a training checkpoint (no train_state.json)")
        if "query_encoder" in (state.get("models") or []):
            path = checkpoint.rstrip("/") + "/query_encoder"
    return spec.load(name_or_path=fetch_model_dir(path, s3_options)).eval()


def retrieve_from_config(
    cfg,
    qa: str,
    out: str,
    *,
    k: int = 100,
    limit: int | None = None,
    checkpoint: str | None = None,
    index_uri: str | None = None,
) -> dict:
    """``raggen retrieve``: the questions of ``qa`` (DPR .qa.csv or QA JSONL, path or s3://; the first
    ``limit``) against ``index_uri`` (default ``train.index``, the index ``raggen eval`` scores) with
    the config's (or ``checkpoint``'s) query encoder; DPR's results JSON to ``out``."""
    from raggen.corpus.qa import read_qa
    from raggen.index import open_index
    from raggen.train.evaluate import progress_bar

    s3 = cfg.train.s3.storage_options()
    examples = read_qa(qa, s3_options=s3)
    examples = examples[:limit] if limit else examples
    from raggen.retrieval import with_retrieval

    encoder = load_query_encoder(cfg, checkpoint, s3)
    uri = index_uri or cfg.train.index
    # searched as `raggen eval` searches it (index.search: shard actors for a large index, nprobe ...)
    index = open_index(uri, settings=cfg.index.search, s3_options=s3, load_embeddings=False, start_ray=True)
    index = with_retrieval(index, uri, cfg.retrieval, s3_options=s3)  # retrieval.mode
    try:
        with progress_bar(len(examples), "retrieve") as bar:
            accuracy = retrieve_results(
                examples, query_encoder=encoder, index=index, k=k, out=out, s3_options=s3, progress=bar.update
            )
    finally:
        index.close()  # ends the shard actors it started, if any
    return {"questions": len(examples), "index_version": index.version, "out": out, **accuracy}
