"""Rehearse a recipe on a CPU before renting GPUs: ``raggen dry-run CONFIG --out DIR``.

The config runs as it is, with overrides only for sizes and paths:

* every model it names that cannot be loaded here is replaced by a tiny random model *of the same
  class* (``raggen.models.stand_ins``: DPR context/question encoders, BART, T5, Llama, ...);
* the corpus and QA files are a small generated world (a few hundred passages) written where the
  config expects them (its own ``s3://`` URIs on the S3 endpoint given, or local folders);
* sizes shrink (2 shards, a small IVF, 2 training steps on 2 Ray Train workers, 1 replica each).

Then the real pipeline runs: Ray Data encoding -> FAISS shards -> publish -> Ray Train ->
eval -> Ray Serve answering one question over HTTP. :func:`dry_run_overrides` gives the ``--set``
lines, so the same rehearsal can be run step by step with the ordinary commands.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from raggen.config import RaggenConfig, load_config, with_absolute_paths
from raggen.errors import ConfigError

log = logging.getLogger(__name__)

#: the config fields that name a model
MODEL_FIELDS = (
    "index.encoder.name_or_path",
    "model.query_encoder.name_or_path",
    "model.posterior_encoder.name_or_path",
    "model.generator",
    "model.reranker",
)
#: config fields that name data or stores (rewritten under the dry run's folder unless on S3)
PATH_FIELDS = (
    "world.out_dir", "index.passages", "index.output", "train.storage_path", "train.train_file",
    "train.dev_file", "train.index", "serve.index", "serve.model_dir",
)  # fmt: skip
S3_SECTIONS = ("index.s3", "train.s3", "serve.s3")
#: the longest passage (in tokens) a dry run encodes
DRY_RUN_MAX_TOKENS = 128


def _get(cfg: RaggenConfig, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if node is None:
            return None
        node = getattr(node, key)
    return node


def model_fields(cfg: RaggenConfig) -> dict[str, str]:
    """{field: model id or path} for every model the config names."""
    return {f: v for f in MODEL_FIELDS if (v := _get(cfg, f))}


def stand_in_overrides(cfg: RaggenConfig, out_dir: str | os.PathLike) -> list[str]:
    """``field=path`` for each named model that is not loadable here, pointing at a tiny model of its
    class built under ``out_dir/models`` (one per distinct name)."""
    from raggen.models.stand_ins import is_available_here, make_stand_in

    made: dict[str, str] = {}
    out = []
    for field, name in model_fields(cfg).items():
        if name.startswith("s3://") or is_available_here(name):
            continue  # an s3:// model is the run's own output (serve.model_dir) or fetched as it is
        if name not in made:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-")
            made[name] = make_stand_in(name, str(Path(out_dir) / "models" / slug), seed=len(made))
        out.append(f"{field}={made[name]}")
    return out


def small_factory(factory: str) -> str:
    """The same FAISS index family at a size a few hundred vectors can train: IVF lists -> 8."""
    return re.sub(r"IVF\d+", "IVF8", factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def size_overrides(cfg: RaggenConfig, num_passages: int) -> list[str]:
    """Sizes a 2-core CPU machine runs in minutes; nothing that changes which code runs."""
    t = cfg.train
    return [
        "index.num_shards=2", "index.num_actors=1", "index.actor_num_cpus=0.5", "index.actor_num_gpus=0",
        "index.batch_size=32", f"index.train_sample={num_passages}",
        # passages at most 128 tokens (a real encoder such as MiniLM at 256 costs twice the CPU time)
        f"index.encoder.max_length={min(cfg.index.encoder.max_length, DRY_RUN_MAX_TOKENS)}",
        # shard actors of a real recipe (index.search.mode: actors) sized for 2 cores
        "index.search.actor_num_cpus=0.25", "index.search.actor_num_gpus=0",
        f"index.faiss_factory={small_factory(cfg.index.faiss_factory)}",
        "train.steps=2", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.use_gpu=false",
        "train.batch_size=2", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_examples=8",
        "train.max_failures=0", f"train.top_k={min(t.top_k, 4)}", f"train.jsa.num_proposals={min(t.jsa.num_proposals, 4)}",
        f"train.gumbel.candidates={min(t.gumbel.candidates, 6)}", f"train.gumbel.k={min(t.gumbel.k, 2)}",
        f"train.refresh_index_every={1 if t.refresh_index_every else 0}",
        "serve.host=127.0.0.1", f"serve.port={_free_port()}", "serve.replica_num_cpus=0.1", "serve.replica_num_gpus=0",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1", "serve.num_beams=2",
        "serve.max_new_tokens=8", "serve.watch_latest=false",
        "serve.deployments={}",  # per-deployment GPUs/RAM of a real recipe: the shared small defaults instead
    ]  # fmt: skip


def path_overrides(cfg: RaggenConfig, out_dir: Path, s3_endpoint: str | None) -> list[str]:
    """Local paths move under ``out_dir``; ``s3://`` URIs stay (on ``s3_endpoint``) or, with no
    endpoint, become folders under ``out_dir/s3``."""
    out = []
    for field in PATH_FIELDS:
        value = _get(cfg, field)
        if not value:
            continue
        if value.startswith("s3://"):
            if s3_endpoint is None:
                out.append(f"{field}={out_dir / 's3' / value[len('s3://') :]}")
        else:
            out.append(f"{field}={out_dir / 'local' / value.lstrip('/')}")
    if s3_endpoint is not None:
        out += [f"{section}.endpoint_url={s3_endpoint}" for section in S3_SECTIONS]
    return out


def dry_run_overrides(
    config: str | None,
    out_dir: str | os.PathLike,
    *,
    s3_endpoint: str | None = None,
    num_passages: int = 300,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Every ``--set`` line of the dry run of ``config`` (stand-ins first, then sizes and paths)."""
    cfg = load_config(config, list(overrides))
    out = Path(out_dir).resolve()
    return [*stand_in_overrides(cfg, out), *size_overrides(cfg, num_passages), *path_overrides(cfg, out, s3_endpoint)]


def _s3_options(cfg: RaggenConfig) -> dict[str, Any] | None:
    return cfg.index.s3.storage_options()


def write_inputs(cfg: RaggenConfig, num_passages: int) -> dict[str, str]:
    """A generated world of about ``num_passages`` passages, written where the config reads its corpus
    and QA files (uploaded when those are ``s3://`` URIs)."""
    from raggen.corpus.readers import read_passages, write_passages
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.storage import is_s3_uri, write_bytes

    files = write_world(cfg.world.out_dir, WorldConfig(num_entities=max(50, num_passages // 2), seed=cfg.world.seed))
    targets = {cfg.train.train_file: files.qa_jsonl("train"), cfg.train.dev_file: files.qa_jsonl("dev")}
    if _reads_documents(cfg):  # one Markdown document per world passage, in the config's folder
        from raggen.corpus.documents import write_markdown_documents

        local_docs = write_markdown_documents(
            read_passages(files.passages_v1), Path(cfg.world.out_dir) / "dry-run-docs"
        )
        targets.update({f"{cfg.index.passages.rstrip('/')}/{p.name}": p for p in sorted(local_docs.iterdir())})
    else:
        fmt = {"dpr-tsv": "tsv", "auto": "tsv"}.get(cfg.index.format, cfg.index.format)  # tsv | jsonl | parquet
        local_passages = Path(cfg.world.out_dir) / f"dry-run-passages.{fmt}"
        write_passages(local_passages, read_passages(files.passages_v1), format=fmt)
        targets[cfg.index.passages] = local_passages
    for uri, local in targets.items():
        if is_s3_uri(uri):
            write_bytes(uri, Path(local).read_bytes(), _s3_options(cfg))
        elif Path(uri).resolve() != Path(local).resolve():
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            Path(uri).write_bytes(Path(local).read_bytes())
    return {k: str(v) for k, v in targets.items()}


def _reads_documents(cfg: RaggenConfig) -> bool:
    """A documents config (``index.input: documents``): its corpus is a folder of documents."""
    return cfg.index.input == "documents"


def ask_once(cfg: RaggenConfig, question: str) -> dict[str, Any]:
    """Deploy the config's Serve graph, ask one question over HTTP, shut Serve down."""
    from ray import serve

    from raggen.app.serving import serve_from_config
    from raggen.serve.client import ask

    url = serve_from_config(cfg, blocking=False)
    try:
        return ask(
            url,
            question,
            top_k=2,
            decoding="rag-token",
            max_new_tokens=8,
            token_env=cfg.serve.api_token_env,
            timeout=120.0,
        )
    finally:
        serve.shutdown()


def run_dry_run(
    config: str | None,
    out_dir: str | os.PathLike,
    *,
    s3_endpoint: str | None = None,
    num_passages: int = 300,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The whole rehearsal; returns what each stage produced and how long it took."""
    from raggen.app.evaluation import evaluate_from_config
    from raggen.app.indexing import build_index_from_config
    from raggen.app.training import run_training
    from raggen.corpus.qa import read_qa
    from raggen.ray_utils import ensure_ray

    lines = dry_run_overrides(config, out_dir, s3_endpoint=s3_endpoint, num_passages=num_passages, overrides=overrides)
    cfg = with_absolute_paths(load_config(config, [*overrides, *lines]))
    report: dict[str, Any] = {"config": config, "overrides": lines, "seconds": {}}

    def stage(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        log.info("dry run: %s", name)
        value = fn(*args, **kwargs)
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        return value

    stage("inputs", write_inputs, cfg, num_passages)
    ensure_ray()
    manifest = stage("index", build_index_from_config, cfg)  # documents chunked first
    report["index"] = {
        "version": manifest.version,
        "passages": manifest.num_passages,
        "encoder": manifest.encoder.model_dump(),
        "faiss_factory": manifest.faiss_factory,
    }
    trained = stage("train", run_training, cfg)
    report["train"] = {"final": trained["final"], "metrics": trained["metrics"]}
    report["eval"] = stage("eval", evaluate_from_config, cfg, checkpoint=trained["final"], split="dev")
    question = read_qa(cfg.train.dev_file, s3_options=cfg.train.s3.storage_options())[0].question
    report["answer"] = stage("serve", ask_once, cfg, question)
    report["question"] = question
    if not report["answer"].get("passages"):
        raise ConfigError(f"dry run: the service answered {question!r} without evidence passages")
    return report
