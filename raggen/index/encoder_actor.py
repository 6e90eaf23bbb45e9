"""Stage 2b of the encode pipeline: the encoder actor (the model only, on length buckets) and the
size of its pool.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from raggen.index.passage_tokens import NUM_TOKENS, TOKEN_COLUMNS, tokenize_batch

logger = logging.getLogger(__name__)


def length_buckets(num_tokens: np.ndarray, *, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices grouped into sub-batches of similar length, shortest first.

    Rows sorted by length are cut greedily so that rows x longest row (the padded size the model
    sees) stays within ``max_tokens`` and rows within ``max_rows``; a row longer than the budget
    runs alone. Short rows thus share a sub-batch without paying for the long rows' padding.
    """
    order = np.argsort(num_tokens, kind="stable")
    buckets, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order):
            buckets.append(order[start:])
            break
        rows, longest = i - start + 1, int(num_tokens[order[i]])  # if row i joined the current bucket
        if rows > max_rows or rows * longest > max_tokens:
            buckets.append(order[start:i])
            start = i
    return buckets


def trim_padding(tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(r, width) -> (r, t): drop the columns that are padding in every row (either padding side)."""
    used = np.flatnonzero(tokens["attention_mask"].any(axis=0))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
    return {name: col[:, lo:hi] for name, col in tokens.items()}


def embed_bucketed(
    encoder, tokens: dict[str, np.ndarray], num_tokens: np.ndarray, *, max_rows: int, max_tokens: int
) -> np.ndarray:
    """Token columns (b, width) -> vectors (b, dim) float32, row i for input row i.

    The model runs on length buckets (:func:`length_buckets`), each trimmed to its longest row;
    the sub-batches' vectors stay on the device until the end (one host sync per call, so the
    next sub-batch is queued while the GPU works), then go back to the input order.
    ``encoder`` is a ``TextEncoder`` in eval mode.
    """
    import torch

    parts, rows_of = [], []
    with torch.inference_mode():
        for rows in length_buckets(num_tokens, max_rows=max_rows, max_tokens=max_tokens):
            sub = trim_padding({name: col[rows] for name, col in tokens.items()})  # (r, t) each
            batch = {name: torch.from_numpy(col).to(encoder.device).long() for name, col in sub.items()}
            parts.append(encoder.embed(batch))  # (r, dim), on the device
            rows_of.append(rows)
        if not parts:
            return np.zeros((0, encoder.dim), np.float32)
        vectors = torch.cat(parts).float().cpu().numpy()  # (b, dim) in bucket order
    out = np.empty_like(vectors)
    out[np.concatenate(rows_of)] = vectors
    return out


class PassageEncoderActor:
    """Ray Data callable class: the model is loaded once per actor and only runs the model.

    Input rows carry the token columns of :func:`tokenize_batch` (a batch without them, from a
    caller using the actor alone, is tokenised here). Each batch is encoded in length buckets of
    at most ``sub_batch_tokens`` padded tokens (:func:`embed_bucketed`). CUDA + bf16 when the
    actor has a GPU, CPU + fp32 otherwise (raggen.devices). Output: the input columns minus the
    token columns, plus ``embedding`` (b, dim) float32, rows in input order.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        max_length: int = 256,
        normalize: bool = False,
        torch_threads: int | None = None,
        s3_options: Mapping[str, Any] | None = None,
        passage_format: str | None = None,
        sub_batch_tokens: int = 16384,
        passage_prefix: str = "",
    ):
        import torch

        from raggen.devices import pick_device, pick_dtype
        from raggen.models.loading import fetch_model_dir
        from raggen.models.retriever import TextEncoder

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        device = pick_device()
        self.encoder = TextEncoder.from_pretrained(
            fetch_model_dir(name_or_path, s3_options),
            pooling=pooling,
            max_length=max_length,
            normalize=normalize,
            device=device,
            dtype=pick_dtype(device),
            passage_format=passage_format,
            passage_prefix=passage_prefix,
        ).eval()
        self.max_length, self.sub_batch_tokens = max_length, sub_batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "input_ids" not in batch:
            batch = tokenize_batch(
                batch,
                tokenizer=self.encoder.tokenizer,
                passage_format=self.encoder.passage_format,
                max_length=self.max_length,
                prefix=self.encoder.passage_prefix,
            )
        tokens = {name: np.asarray(batch[name]) for name in TOKEN_COLUMNS if name in batch}
        num_tokens = np.asarray(batch[NUM_TOKENS])
        emb = embed_bucketed(
            self.encoder, tokens, num_tokens, max_rows=max(1, len(num_tokens)), max_tokens=self.sub_batch_tokens
        )  # (b, dim) float32
        rest = {name: col for name, col in batch.items() if name not in TOKEN_COLUMNS and name != NUM_TOKENS}
        return {**rest, "embedding": emb}


def encoder_pool(
    num_actors: int | None,
    actor_num_cpus: float,
    actor_num_gpus: float | None,
    torch_threads: int | None,
    resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The encoder actor pool, sized from the cluster's resources where not given: one actor per
    GPU on a GPU cluster (``actor_num_gpus`` None: 1 when there are GPUs), else
    ``max(1, (CPUs - max(1, actor_num_cpus) - 0.5) // actor_num_cpus)`` (CPUs left for Ray Data's
    read and tokenise tasks: with fewer the pipeline stalls); each actor
    runs ``actor_num_cpus`` torch threads. ``resources`` default: what the cluster has free now
    (a refresh inside a training run must not wait for the CPUs its own workers hold)."""
    if resources is None:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        resources = {"CPU": free.get("CPU", 0) or total.get("CPU", 1), "GPU": free.get("GPU", 0)}
        if total.get("GPU", 0) >= 1 and actor_num_gpus is None:
            actor_num_gpus = 1.0  # a GPU cluster encodes on GPUs, even if they are busy right now
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if actor_num_gpus is None:
        actor_num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_actors is None:
        # Ray Data's read/list tasks (1 CPU) and the tokenise tasks (0.25-0.5 CPU) must still run beside
        # the pool, or the pipeline deadlocks (2 CPUs, 0.5-CPU actors: 1 actor)
        spare = max(1.0, actor_num_cpus) + 0.5
        num_actors = (
            max(1, int(gpus // actor_num_gpus)) if actor_num_gpus > 0 else max(1, int((cpus - spare) // actor_num_cpus))
        )
        logger.info(
            "encoder pool: %d actors of %s CPU, %s GPU (index.num_actors: null = from the cluster)",
            num_actors,
            actor_num_cpus,
            actor_num_gpus,
        )
    return {
        "num_actors": int(num_actors),
        "actor_num_gpus": float(actor_num_gpus),
        "torch_threads": int(torch_threads or max(1, int(actor_num_cpus))),
    }


def tokenize_task_limit(num_actors: int, actor_num_gpus: float) -> int | None:
    """How many tokenise tasks may run at once: on CPU actors one per actor plus one in reserve (a
    CPU encoder is tens of times slower than the Rust tokenizer, and every further concurrent task
    is one more Ray worker process that imports transformers' tokenizer code for nothing); on GPU
    actors no limit (None: Ray Data scales the tasks to feed the GPUs)."""
    return None if actor_num_gpus > 0 else int(num_actors) + 1
