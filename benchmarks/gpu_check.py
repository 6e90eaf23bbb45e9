"""Claim: on one CUDA machine raggen's GPU paths run at production speed, checked by one command in
at most 5 minutes; a machine without CUDA runs the same code paths at tiny sizes.

(a) passage encoding with a BERT-base-shaped DPR context encoder (768-d CLS, 12 layers, bf16,
    max_length 256, synthetic ~100-word passages) through the real Ray Data pipeline
    (``raggen.index.encode.encode_passages``: tokenise tasks + one encoder actor per GPU), beside a
    plain single-process loop (``TextEncoder.encode_passages``: same model, dtype and batch size)
    and the model alone on pre-tokenised, length-bucketed batches (the actor's ceiling).
    Goal on an H100/H200: >= 17,000 passages/s through the pipeline.
(b) an IVF-PQ index built on the GPU (``raggen.index.shard.build_shard_index``: faiss-gpu k-means
    and adds) and searched there (``to_gpu``: ``index_cpu_to_gpu``) and on the CPU (the same
    index): queries/s of both, the ratio, and recall@10 of both against exact search, on
    clustered synthetic unit vectors.
(c) 5 Ray Train steps of JSA (``raggen.app.training.run_training``, one worker, one GPU) with a
    BART-base-shaped reader and a BERT-base-shaped DPR query encoder over a small Flat index of
    the passages encoded in (a): s/step.

    .venv/bin/python benchmarks/gpu_check.py          # full size on CUDA (tiny sizes without CUDA)
    .venv/bin/python benchmarks/gpu_check.py --tiny   # tiny models and data: < 3 min on 2 CPU cores
    .venv/bin/python benchmarks/gpu_check.py --address 127.0.0.1:6379   # on a running cluster

Prints a header line naming the machine, then one table; rows that need a GPU read
"n/a (no GPU)". All weights are random: speed is measured, not quality (recall is the index's).
Pipeline passages/s: "steady" counts rows after the first driver batch arrives over the time
since (actor start-up and the first block's latency excluded); "stage 2" is the whole
tokenise + encode + write call with the stage-1 split already done (its time is in the note).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machines: idle OpenMP threads must not spin
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from _common import format_table, machine  # noqa: E402

NO_GPU = "n/a (no GPU)"
BERT_BASE = {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072}
BART_BASE = {"d_model": 768, "layers": 6, "heads": 12, "ffn": 3072}  # BartConfig() defaults are bart-large's


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full (GPU) run and the tiny (CPU) run."""

    name: str
    encoder: dict | None  # DPR encoder dims; None = raggen's tiny DPR stand-in (64-d, 2 layers)
    reader: dict | None  # BART dims; None = raggen's tiny BART
    passages: int  # through the Ray Data pipeline
    plain_passages: int  # through the plain loop and the model-only loop
    batch_size: int  # rows per actor batch and per plain-loop batch
    sub_batch_tokens: int  # padded tokens per model call in the actor (length buckets)
    nb: int  # (b): database vectors
    nq: int  # (b): queries
    dim: int  # (b): vector width
    factory: str  # (b): the IVF-PQ index
    nprobe: int
    index_rows: int  # (c): passages in the training index
    train_batch: int  # (c): examples per step
    top_k: int
    proposals: int
    source_length: int
    target_length: int
    max_length: int = 256


FULL = Sizes(
    "full",
    BERT_BASE,
    BART_BASE,
    passages=200_000,
    plain_passages=32_768,
    batch_size=1024,
    sub_batch_tokens=32_768,
    nb=500_000,
    nq=10_000,
    dim=768,
    factory="IVF4096,PQ64",
    nprobe=32,
    index_rows=20_000,
    train_batch=8,
    top_k=10,
    proposals=50,
    source_length=300,
    target_length=32,
)
TINY = Sizes(
    "tiny",
    None,
    None,
    passages=400,
    plain_passages=400,
    batch_size=64,
    sub_batch_tokens=16_384,
    nb=10_000,
    nq=500,
    dim=64,
    factory="IVF32,PQ16",
    nprobe=8,
    index_rows=400,
    train_batch=4,
    top_k=3,
    proposals=4,
    source_length=96,
    target_length=12,
)


def row(check: str, value, unit: str, note: str = "", fmt: str = "{:,.0f}") -> list[str]:
    """One table row; a string value (e.g. "n/a (no GPU)") is shown as is."""
    return [check, value if isinstance(value, str) else fmt.format(value), unit, note]


# ------------------------------------------------------------------------------------------ models and data


def make_dpr(out: str, side: str, dims: dict | None) -> str:
    """A random-init DPR encoder of ``dims`` (BERT-base) or raggen's tiny stand-in, with the bundled tokenizer."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    from raggen.models.retriever import save_pretrained_atomic
    from raggen.models.stand_ins import make_tiny_dpr_encoder
    from raggen.models.tiny import MAX_POSITIONS, PAD_ID, VOCAB_SIZE, tiny_tokenizer

    if dims is None:
        return make_tiny_dpr_encoder(out, side)
    config = DPRConfig(vocab_size=VOCAB_SIZE, hidden_size=dims["hidden"], num_hidden_layers=dims["layers"],
                       num_attention_heads=dims["heads"], intermediate_size=dims["ffn"],
                       max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_ID)  # fmt: skip
    torch.manual_seed(0)
    model = (DPRContextEncoder if side == "ctx" else DPRQuestionEncoder)(config)
    save_pretrained_atomic(out, model, tiny_tokenizer())
    return out


def make_reader(out: str, dims: dict | None) -> str:
    from raggen.models.tiny import make_tiny_generator

    if dims is None:
        return make_tiny_generator(out, kind="bart")
    return make_tiny_generator(
        out, kind="bart", d_model=dims["d_model"], layers=dims["layers"], heads=dims["heads"], ffn=dims["ffn"]
    )


def synthetic_passages(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts): 85-100 random words each, one in seven a glued pair that WordPiece
    splits (about 1.4 tokens per word, as DPR's Wikipedia passages); 1-3 word titles, one in ten empty."""
    from raggen.models.tiny import tiny_tokenizer

    vocab = np.array(sorted(w for w in tiny_tokenizer().get_vocab() if w.isascii() and w.isalpha() and len(w) >= 3))
    rng = np.random.default_rng(seed)
    glued = np.char.add(vocab[rng.integers(0, len(vocab), 4000)], vocab[rng.integers(0, len(vocab), 4000)])
    words = np.concatenate([vocab, glued])
    weights = np.concatenate([np.full(len(vocab), 6 / 7 / len(vocab)), np.full(len(glued), 1 / 7 / len(glued))])
    counts = rng.integers(85, 101, size=n)
    picks = rng.choice(len(words), size=(n, 100), p=weights)
    texts = [" ".join(words[picks[i, : counts[i]]].tolist()) for i in range(n)]
    title_len = rng.choice(4, size=n, p=[0.1, 0.3, 0.4, 0.2])
    title_words = vocab[rng.integers(0, len(vocab), size=(n, 3))]
    titles = [" ".join(title_words[i, : title_len[i]].tolist()).capitalize() for i in range(n)]
    return [f"p{i}" for i in range(n)], titles, texts


def write_tsv(path: Path, ids: list[str], titles: list[str], texts: list[str]) -> Path:
    """DPR's psgs_w100.tsv layout (id, text, title), which ``encode_passages`` reads."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{i}\t{x}\t{t}\n" for i, x, t in zip(ids, texts, titles))
    return path


# ------------------------------------------------------------------------------------------ (a) encoding


def pipeline_rate(tsv: Path, work: Path, encoder: str, s: Sizes, gpus: int) -> dict:
    """Stage 2 of ``encode_passages`` timed end to end and in steady state (stage 1 done first)."""
    from raggen.index.build_settings import IndexBuildSettings
    from raggen.index.encode import encode_passages
    from raggen.index.shard_split import split_by_shard
    from raggen.index.work_dir import lock_work_dir
    from raggen.models.retriever import EncoderSpec

    info, lock = lock_work_dir(work)  # the work dir encode_passages then finds split and resumes
    try:
        t0 = time.perf_counter()
        split_by_shard(str(tsv), work, format="auto", num_shards=1, s3_options=None, work_id=info["id"])
        split_s = time.perf_counter() - t0
    finally:
        lock.release()
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    encoded = encode_passages(
        str(tsv), work, encoder=EncoderSpec(name_or_path=encoder, pooling="cls", max_length=s.max_length),
        settings=IndexBuildSettings(batch_size=s.batch_size, num_shards=1, num_actors=max(1, gpus),
                                    actor_num_cpus=1.0 if gpus else 0.5, actor_num_gpus=1.0 if gpus else 0.0),
        tokenize_num_cpus=1.0 if gpus else 0.25, sub_batch_tokens=s.sub_batch_tokens,
        progress=lambda rows: marks.append((time.perf_counter(), rows)),
    )  # fmt: skip
    stage2_s = time.perf_counter() - t0
    assert encoded.num_passages == s.passages, (encoded.num_passages, s.passages)
    steady = None
    if len(marks) >= 3:  # rows after the first driver batch, over the time since it arrived
        steady = sum(r for _, r in marks[1:]) / (marks[-1][0] - marks[0][0])
    return {
        "encoded": encoded,
        "split_s": split_s,
        "stage2": s.passages / stage2_s,
        "steady": steady,
        "batches": len(marks),
    }


def plain_rates(encoder: str, titles: list[str], texts: list[str], s: Sizes) -> dict:
    """The plain loop (tokenise + model per batch, one process) and the model alone on
    pre-tokenised, length-bucketed batches; same model, dtype and batch size as the actor."""
    from raggen.devices import pick_device, pick_dtype
    from raggen.index.encoder_actor import embed_bucketed
    from raggen.index.passage_tokens import NUM_TOKENS, TOKEN_COLUMNS, tokenize_batch
    from raggen.models.retriever import TextEncoder

    device, threads = pick_device(), torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the CPU actor (torch_threads = its CPU share, at least 1)
    enc = TextEncoder.from_pretrained(encoder, pooling="cls", max_length=s.max_length, device=device,
                                      dtype=pick_dtype(device)).eval()  # fmt: skip
    bs, n = s.batch_size, len(texts)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    enc.encode_passages(titles[:bs], texts[:bs], batch_size=bs)  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    enc.encode_passages(titles, texts, batch_size=bs)
    sync()
    plain = n / (time.perf_counter() - t0)

    tokens = tokenize_batch({"title": np.array(titles), "text": np.array(texts)}, tokenizer=enc.tokenizer,
                            passage_format=enc.passage_format, max_length=s.max_length)  # fmt: skip
    cols, lengths = {c: tokens[c] for c in TOKEN_COLUMNS if c in tokens}, tokens[NUM_TOKENS]

    def embed(i: int) -> np.ndarray:
        return embed_bucketed(enc, {c: v[i : i + bs] for c, v in cols.items()}, lengths[i : i + bs], max_rows=bs,
                              max_tokens=s.sub_batch_tokens)  # fmt: skip

    embed(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, bs):
        embed(i)
    model_only = n / (time.perf_counter() - t0)
    enc = None  # free the model before (b) (the closure above holds the name, not the object)
    torch.set_num_threads(threads)  # torch and faiss share OpenMP: give (b) every core back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"plain": plain, "model_only": model_only, "mean_tokens": float(lengths.mean()), "device": device.type}


def check_encoding(s: Sizes, work: Path, encoder: str, gpus: int) -> tuple[list[list[str]], object]:
    ids, titles, texts = synthetic_passages(s.passages)
    tsv = write_tsv(work / "passages.tsv", ids, titles, texts)
    pipe = pipeline_rate(tsv, work / "encode", encoder, s, gpus)
    m = min(s.plain_passages, s.passages)
    plain = plain_rates(encoder, titles[:m], texts[:m], s)
    steady = pipe["steady"] if pipe["steady"] is not None else pipe["stage2"]
    where = f"{max(1, gpus)} actor(s) on GPU, bf16" if gpus else "1 actor on CPU, fp32"
    what = "DPR ctx encoder BERT-base" if s.encoder else "tiny DPR ctx encoder"
    setup = f"{what}, max_length {s.max_length}, mean {plain['mean_tokens']:.0f} tokens/passage, batch {s.batch_size}"
    steady_note = (
        f"{where}; tokenise tasks; {s.passages:,} passages; goal >= 17,000 on H100/H200"
        if pipe["steady"] is not None
        else f"{where}; too few driver batches: = stage 2 rate"
    )
    rows = [
        row("(a) encode: Ray Data pipeline, steady", steady, "passages/s", steady_note),
        row(
            "(a) encode: Ray Data pipeline, stage 2",
            pipe["stage2"],
            "passages/s",
            f"incl. actor start-up + parquet writes; stage-1 split took {pipe['split_s']:.1f} s",
        ),
        row(
            "(a) encode: plain loop, 1 process",
            plain["plain"],
            "passages/s",
            f"TextEncoder.encode_passages on {m:,} passages, {plain['device']}; {setup}",
        ),
        row(
            "(a) encode: pipeline / plain",
            steady / max(1, gpus) / plain["plain"],
            "x",
            "steady pipeline rate (per GPU) over the plain loop's",
            fmt="{:.2f}",
        ),
        row(
            "(a) encode: model only, bucketed",
            plain["model_only"],
            "passages/s",
            f"pre-tokenised, length buckets of <= {s.sub_batch_tokens:,} tokens: the actor's ceiling",
        ),
    ]
    return rows, pipe["encoded"]


# ------------------------------------------------------------------------------------------ (b) faiss


def clustered_unit_vectors(n: int, centers: np.ndarray, rng: np.random.Generator, noise: float = 0.6) -> np.ndarray:
    """(n, d) float32 unit vectors around random centers (a stand-in for passage embeddings)."""
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(I, gt)]))


def timed_search(index, xq: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    """(queries/s of the fastest of ``repeats`` batched searches, I)."""
    index.search(xq[: min(len(xq), 64)], k)  # warm-up
    best, I = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, I = index.search(xq, k)
        best = min(best, time.perf_counter() - t0)
    return len(xq) / best, I


def check_faiss(s: Sizes, k: int = 10) -> list[list[str]]:
    import faiss

    from raggen.index.shard import build_shard_index, gpu_available, set_search_params, to_gpu

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(64, s.nb // 500), s.dim), dtype=np.float32)
    xb, xq = clustered_unit_vectors(s.nb, centers, rng), clustered_unit_vectors(s.nq, centers, rng)
    gpu = gpu_available()
    if gpu and hasattr(faiss, "knn_gpu"):
        _, gt = faiss.knn_gpu(faiss.StandardGpuResources(), xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        _, gt = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    cpu_index = build_shard_index(xb, np.arange(s.nb), factory=s.factory, metric="ip", train_sample=min(s.nb, 200_000),
                                  use_gpu=gpu)  # fmt: skip
    build_s = time.perf_counter() - t0
    set_search_params(cpu_index, nprobe=s.nprobe)
    cpu_qps, cpu_I = timed_search(cpu_index, xq, k)
    gpu_qps = gpu_recall = NO_GPU
    if gpu:
        clone = faiss.clone_index(cpu_index)
        faiss.extract_index_ivf(clone).set_direct_map_type(faiss.DirectMap.NoMap)  # GPU IVF keeps no id map
        gpu_index = to_gpu(clone)
        if type(gpu_index).__name__.startswith("Gpu"):
            faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", s.nprobe)
            gpu_qps, gpu_I = timed_search(gpu_index, xq, k)
            gpu_recall = recall_at(gpu_I, gt, k)
        else:
            gpu_qps = gpu_recall = "n/a (no GPU clone)"
    # the wiki config's index type: the same IVF-PQ with an fp16 re-ranking stage (FAISS's GPU cloner
    # may not take IndexRefine: build_shard_index then adds on the CPU, which this row's time shows)
    t0 = time.perf_counter()
    refined = build_shard_index(xb, np.arange(s.nb), factory=f"{s.factory},Refine(SQfp16)", metric="ip",
                                train_sample=min(s.nb, 200_000), use_gpu=gpu)  # fmt: skip
    refine_build_s = time.perf_counter() - t0
    set_search_params(refined, nprobe=s.nprobe, refine_k_factor=4)
    refine_qps, refine_I = timed_search(refined, xq, k)
    setup = f"{s.factory}, nprobe {s.nprobe}, {s.nb:,} x {s.dim}-d clustered unit vectors, {s.nq:,} queries, k {k}"
    where = "on GPU (k-means + adds)" if gpu else "on CPU (no faiss GPU)"
    ratio = gpu_qps / cpu_qps if not isinstance(gpu_qps, str) else gpu_qps
    threads = faiss.omp_get_max_threads()
    return [
        row("(b) faiss IVF-PQ build (train + add)", build_s, "s", f"{where}; {setup}", fmt="{:.2f}"),
        row(
            "(b) faiss IVF-PQ search, GPU",
            gpu_qps,
            "queries/s",
            "batched; the built index, index_cpu_to_gpu (fp16 LUTs)",
        ),
        row("(b) faiss IVF-PQ search, CPU", cpu_qps, "queries/s", f"batched; the same index, {threads} OpenMP threads"),
        row("(b) faiss search GPU / CPU", ratio, "x", "", fmt="{:.1f}"),
        row("(b) faiss recall@10 vs exact, GPU", gpu_recall, "", "exact = brute-force inner product", fmt="{:.3f}"),
        row("(b) faiss recall@10 vs exact, CPU", recall_at(cpu_I, gt, k), "", "", fmt="{:.3f}"),
        row(
            "(b) faiss IVF-PQ,Refine(SQfp16) build",
            refine_build_s,
            "s",
            f"use_gpu={gpu}; configs/wiki-dpr-21m.yaml's index type",
            fmt="{:.2f}",
        ),
        row("(b) faiss IVF-PQ,Refine(SQfp16) search, CPU", refine_qps, "queries/s", "batched; refine_k_factor 4"),
        row("(b) faiss recall@10 vs exact, Refine(SQfp16)", recall_at(refine_I, gt, k), "", "", fmt="{:.3f}"),
    ]


# ------------------------------------------------------------------------------------------ (c) training


def publish_small_index(encoded, work: Path, encoder: str, rows: int) -> str:
    """A one-shard Flat index over the first ``rows`` passages encoded in (a), published as v1."""
    import pyarrow.parquet as pq

    from raggen.index import build_shard_index, embeddings_of, make_manifest, publish_version, write_parquet_atomic
    from raggen.index.shard import write_index_file

    table = pq.read_table(encoded.shards[0].path).slice(0, rows)
    xb = embeddings_of(table)  # (rows, d)
    index = build_shard_index(xb, table.column("row_id").to_numpy(), factory="Flat", metric="ip", use_gpu=False)
    files = work / "index-files"
    ipath, ppath = files / "shard-00000.faiss", files / "shard-00000.parquet"
    files.mkdir(parents=True, exist_ok=True)
    write_index_file(index, ipath)
    write_parquet_atomic(table, ppath)
    manifest = make_manifest(
        "v1",
        encoder_name_or_path=encoder,
        pooling="cls",
        dim=xb.shape[1],
        metric="ip",
        faiss_factory="Flat",
        shard_files=[(ipath, ppath, table.num_rows)],
        passage_format="pair",
    )
    root = work / "index"
    publish_version(str(root), manifest, files)
    return str(root)


def check_training(s: Sizes, work: Path, index: str, query_encoder: str, reader: str, gpus: int) -> list[list[str]]:
    from raggen.app.training import run_training
    from raggen.config import load_config
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.train.metrics import read_metrics

    steps = 5
    world = write_world(work / "world", WorldConfig(num_entities=50, seed=0))
    cfg = load_config(None, [
        "train.name=gpu-check-jsa", f"train.storage_path={work / 'runs'}", f"train.train_file={world.train_jsonl}",
        f"train.index={index}", "train.estimator=jsa", f"train.steps={steps}", f"train.batch_size={s.train_batch}",
        f"train.top_k={s.top_k}", f"train.jsa.num_proposals={s.proposals}", "train.num_workers=1",
        f"train.cpus_per_worker={max(1, min(8, (os.cpu_count() or 2) - 2)) if gpus else 0.5}",
        f"train.use_gpu={'true' if gpus else 'false'}", f"train.checkpoint_every={steps}", "train.lr=3e-5",
        f"model.query_encoder.name_or_path={query_encoder}", "model.query_encoder.pooling=cls",
        "model.query_encoder.max_length=64", f"model.generator={reader}",
        f"model.max_source_length={s.source_length}", f"model.max_target_length={s.target_length}",
    ])  # fmt: skip
    t0 = time.perf_counter()
    out = run_training(cfg)
    fit_s = time.perf_counter() - t0
    records, _ = read_metrics(out["metrics_jsonl"])
    times = [r["step_time_s"] for r in records]
    assert len(times) == steps, f"expected {steps} step records, got {len(times)}"
    what = "BART-base reader + BERT-base DPR query encoder" if s.reader else "tiny BART reader + tiny DPR query encoder"
    where = "1 worker, 1 GPU, bf16 autocast" if gpus else "1 worker, CPU, 0.5 CPU"
    return [row("(c) JSA Ray Train step", statistics.mean(times[1:]), "s/step",
                f"mean of steps 2-{steps} (step 1: {times[0]:.2f} s; fit {fit_s:.0f} s); {where}; {what}; "
                f"batch {s.train_batch}, top-k {s.top_k}, {s.proposals} proposals, source {s.source_length} tokens",
                fmt="{:.3f}")]  # fmt: skip


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and data (automatic without CUDA)")
    p.add_argument("--passages", type=int, default=None, help="passages through the pipeline (default: by size)")
    p.add_argument("--work-dir", default=None, help="keep everything here (default: a temp folder, removed)")
    p.add_argument("--address", default=None,
                   help="join this running Ray cluster (host:port) instead of starting one on this machine; "
                        "its other work then shares the numbers, and the GPU checks still use this machine's "
                        "GPUs (the driver's)")  # fmt: skip
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    s = TINY if (args.tiny or not gpus) else FULL
    if args.passages:
        s = Sizes(**{**s.__dict__, "passages": args.passages, "index_rows": min(s.index_rows, args.passages)})
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raggen-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)

    import ray
    import ray.data

    t_start = time.perf_counter()
    where = f"; on the Ray cluster at {args.address}" if args.address else ""
    print(f"machine: {machine()}; sizes: {s.name}" + ("" if gpus else " (no CUDA)") + where, flush=True)
    # one tokenizer thread per tokenise task (each task holds its own CPU share)
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if args.address:  # a running cluster: its resources are what it has
        ray.init(address=args.address, log_to_driver=False, runtime_env=runtime_env)
    else:  # keep the dashboard: Ray Train V2 checks its controller through the State API it serves
        ray.init(num_cpus=os.cpu_count() or 2, num_gpus=gpus, log_to_driver=False, runtime_env=runtime_env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        models = work / "models"
        encoder = make_dpr(str(models / "ctx"), "ctx", s.encoder)
        query_encoder = make_dpr(str(models / "question"), "question", s.encoder)
        reader = make_reader(str(models / "reader"), s.reader)
        rows, encoded = check_encoding(s, work, encoder, gpus)
        rows += check_faiss(s)
        index = publish_small_index(encoded, work, encoder, s.index_rows)
        rows += check_training(s, work, index, query_encoder, reader, gpus)
    finally:
        ray.shutdown()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows.append(row("total wall time", time.perf_counter() - t_start, "s", "models, data, Ray start-up and (a)-(c)"))
    print(format_table(["check", "value", "unit", "note"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
