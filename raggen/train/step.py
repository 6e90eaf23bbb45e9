"""One training step per estimator: retrieval -> retriever scores -> the estimator's loss.

Shared pattern (DESIGN, "JSA-RAG training step"): the query vector q(x) is computed with grad,
the index is searched with the *detached* vector, and the scores of the returned passages are
recomputed as q(x) . d(z) from the index's stored passage vectors, so gradients reach the query
encoder while the passage encoder (and the index) stay frozen. With a trained passage encoder
(``StepModels.passage_encoder``) d(z) is re-encoded from the candidates' text with grad instead;
the index vectors then only choose the candidates (REALM's stale-index search, refreshed by the loop).

Nothing here knows about Ray or configs: a step takes the models (possibly DDP-wrapped), an index
with ``search(xq, k)``, a batch and plain settings, and returns the loss (with graph) and detached
diagnostics. Calls whose output needs gradient go through the possibly-wrapped modules (so DDP
synchronises them); no-grad scoring passes use the bare modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from raggen.models.retriever import inner_product_scores
from raggen.objectives import (
    JSAChainCache,
    emdr2_loss,
    gumbel_rerank_loss,
    jsa_loss,
    jsa_mis_inputs,
    mis_sample,
    passage_attention_bias,
    pdist_loss,
    rag_sequence_loss,
    rag_token_loss,
    relaxed_topk_mask,
    sequence_logprob,
    visited_mask,
    vrag_loss,
)
from raggen.retrieval.search import reader_passages, search_passages
from raggen.train.settings import StepSettings


class Index(Protocol):
    def search(self, xq: np.ndarray, k: int) -> Any: ...


@dataclass
class Batch:
    """A batch of QA examples; ``targets`` is what the generator is trained to produce."""

    ids: list[str]
    questions: list[str]
    answers: list[list[str]]
    targets: list[str]

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> Batch:
        """Rows with id, question and answers (the first answer is the training target, as in RAG)."""
        answers = [list(r["answers"]) for r in rows]
        for r, a in zip(rows, answers):
            if not a:
                raise ValueError(f"example {r['id']!r} has no answers to train on")
        return cls([str(r["id"]) for r in rows], [r["question"] for r in rows], answers, [a[0] for a in answers])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StepModels:
    """The modules a step calls.

    ``query_encoder(texts) -> (b, d)``, ``posterior(questions, answers) -> (b, d)``,
    ``reranker(questions, passages) -> (b, c)`` and
    ``generator(questions, passages, targets, fid=False, passage_log_mask=None)`` may be DDP
    wrappers; ``generator_raw`` and ``query_encoder_raw`` are the bare modules for no-grad passes.
    """

    query_encoder: nn.Module
    generator: nn.Module
    generator_raw: nn.Module
    query_encoder_raw: nn.Module | None = None
    posterior: nn.Module | None = None
    reranker: nn.Module | None = None
    passage_encoder: nn.Module | None = None  # trained d(z): candidates are re-encoded with grad

    def __post_init__(self) -> None:
        if self.query_encoder_raw is None:
            self.query_encoder_raw = self.query_encoder


@dataclass
class StepOutput:
    loss: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Retrieved:
    """Candidates per example: passage ids (None marks padding), reader texts, index vectors."""

    ids: list[list[Any]]
    passages: list[list[str]]
    embeddings: torch.Tensor  # (b, k, d) float32
    valid: torch.Tensor | None = None  # (b, k) bool; None = all real
    # (title, text) of each candidate, for re-encoding with a trained passage encoder in its own format
    sources: list[list[tuple[str, str]]] | None = None


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def retrieve(index: Index, queries: torch.Tensor, k: int) -> Retrieved:
    """Search with the detached query vectors (b, d); vectors come back on the queries' device."""
    xq = np.ascontiguousarray(queries.detach().float().cpu().numpy(), dtype=np.float32)
    res = search_passages(index, xq, k, embeddings=True)
    ids = _as_lists(res.ids)
    titles, texts = _as_lists(res.titles), _as_lists(res.texts)
    if any(len(row) < k or "" in row or None in row for row in ids):
        raise ValueError(f"the index returned fewer than k={k} passages for some query (index too small for top_k?)")
    passages = reader_passages(res)
    sources = [list(zip(tr, xr)) for tr, xr in zip(titles, texts)]
    emb = torch.as_tensor(np.asarray(res.embeddings), dtype=torch.float32, device=queries.device)  # (b, k, d)
    return Retrieved(ids, passages, emb, sources=sources)


def with_passage_grad(models: StepModels, cands: Retrieved) -> Retrieved:
    """Candidates whose vectors d(z) come from the trained passage encoder (with grad), not the
    index; unchanged when the passage encoder is frozen."""
    if models.passage_encoder is None:
        return cands
    if cands.sources is None:
        raise ValueError("a trained passage encoder needs each candidate's (title, text): Retrieved.sources is None")
    b, c = len(cands.passages), len(cands.passages[0])
    titles = [t for row in cands.sources for t, _ in row]
    texts = [x for row in cands.sources for _, x in row]
    emb = models.passage_encoder(texts, titles=titles).float().view(b, c, -1)  # (b, c, d)
    return Retrieved(cands.ids, cands.passages, emb, cands.valid, cands.sources)


def _as_lists(values) -> list[list[Any]]:
    if isinstance(values, np.ndarray):
        return values.tolist()
    return [list(row) for row in values]


def candidate_union(first: Retrieved, second: Retrieved) -> Retrieved:
    """Per example, ``first``'s candidates then ``second``'s not already present, padded to the
    longest union in the batch. Padding slots repeat the example's first passage (any real text
    keeps the reader happy) with id None and valid False."""
    b = len(first.ids)
    rows = []
    for i in range(b):
        seen: dict[Any, tuple[str, torch.Tensor, tuple[str, str] | None]] = {}
        for src in (first, second):
            for j, pid in enumerate(src.ids[i]):
                if pid not in seen:
                    source = src.sources[i][j] if src.sources is not None else None
                    seen[pid] = (src.passages[i][j], src.embeddings[i, j], source)
        rows.append(seen)
    c = max(len(r) for r in rows)
    d = first.embeddings.shape[-1]
    emb = first.embeddings.new_zeros(b, c, d)
    valid = torch.zeros(b, c, dtype=torch.bool, device=first.embeddings.device)
    ids: list[list[Any]] = []
    passages: list[list[str]] = []
    sources: list[list[tuple[str, str] | None]] = []
    for i, row in enumerate(rows):
        keys = list(row)
        texts = [row[key][0] for key in keys]
        raw = [row[key][2] for key in keys]
        sources.append(raw + [raw[0]] * (c - len(keys)))
        emb[i, : len(keys)] = torch.stack([row[key][1] for key in keys])
        emb[i, len(keys) :] = row[keys[0]][1]
        valid[i, : len(keys)] = True
        ids.append(keys + [None] * (c - len(keys)))
        passages.append(texts + [texts[0]] * (c - len(keys)))
    has_sources = first.sources is not None and second.sources is not None
    return Retrieved(ids, passages, emb, valid, sources if has_sources else None)


def _scores(queries: torch.Tensor, cands: Retrieved) -> torch.Tensor:
    """(b, d) x (b, c, d) -> (b, c) inner products in float32 (bf16 scores lose ranking detail)."""
    return inner_product_scores(queries.float(), cands.embeddings)


def _seq_logprob(generator: nn.Module, batch: Batch, passages: list[list[str]], length_normalize: bool) -> torch.Tensor:
    tok, mask = generator(batch.questions, passages, batch.targets)  # (b, k, t), (b, t)
    return sequence_logprob(tok, mask, length_normalize=length_normalize)  # (b, k)


def _select(passages: list[list[str]], idx: torch.Tensor) -> list[list[str]]:
    return [[row[j] for j in cols] for row, cols in zip(passages, idx.tolist())]


def _merge(diag: dict[str, torch.Tensor], **extra: torch.Tensor | float) -> dict[str, torch.Tensor]:
    out = dict(diag)
    for key, value in extra.items():
        t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        out[key] = t.float().mean()
    return out


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------


def rag_marginal_step(models: StepModels, index: Index, batch: Batch, settings: StepSettings, **_) -> StepOutput:
    """RAG-Sequence / RAG-Token: the exact marginal over the prior's top-K."""
    q = models.query_encoder(batch.questions)  # (b, d)
    cands = with_passage_grad(models, retrieve(index, q, settings.top_k))
    doc_scores = _scores(q, cands)  # (b, k)
    tok, mask = models.generator(batch.questions, cands.passages, batch.targets)  # (b, k, t)
    loss_fn = rag_sequence_loss if settings.estimator == "rag-sequence" else rag_token_loss
    loss, diag = loss_fn(doc_scores, tok, mask)
    return StepOutput(loss, diag)


def _reader_nll(log_prior: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """PDist's reader loss: the top-K marginal with the prior held fixed (the M-step on
    per-passage likelihoods)."""
    return -torch.logsumexp(log_prior.detach() + seq, dim=-1)  # (b,)


def distill_step(models: StepModels, index: Index, batch: Batch, settings: StepSettings, **_) -> StepOutput:
    """EMDR2 and PDist: the retriever learns from the reader's per-passage likelihoods."""
    q = models.query_encoder(batch.questions)
    cands = with_passage_grad(models, retrieve(index, q, settings.top_k))
    doc_scores = _scores(q, cands)  # (b, k)
    seq = _seq_logprob(models.generator, batch, cands.passages, False)  # (b, k)
    if settings.estimator == "emdr2":
        loss, diag = emdr2_loss(doc_scores, seq)
    else:
        reader = _reader_nll(torch.log_softmax(doc_scores, -1), seq)
        loss, diag = pdist_loss(doc_scores, seq, reader_nll=reader, lm_temperature=settings.pdist_temperature)
    return StepOutput(loss, diag)


def _prior_posterior_candidates(models: StepModels, index: Index, batch: Batch, k: int):
    """q(x) and q'(x, y) with grad, and the union of their top-Ks from the index."""
    if models.posterior is None:
        raise ValueError("estimator needs a posterior retriever (model.posterior_encoder)")
    q = models.query_encoder(batch.questions)  # (b, d)
    qp = models.posterior(batch.questions, batch.targets)  # (b, d)
    cands = candidate_union(retrieve(index, q, k), retrieve(index, qp, k))
    return q, qp, with_passage_grad(models, cands)


def vrag_step(models: StepModels, index: Index, batch: Batch, settings: StepSettings, **_) -> StepOutput:
    """VRAG: E_{q_K}[-log p(y|x,z)] + beta KL(q_K || p) over the union of the two top-Ks.

    The generator runs (with grad) only on the posterior's top-K, the only support of q_K; the
    other union slots get a constant 0 that ``vrag_loss`` never reads.
    """
    q, qp, cands = _prior_posterior_candidates(models, index, batch, settings.top_k)
    prior_logits, post_logits = _scores(q, cands), _scores(qp, cands)  # (b, c)
    top = post_logits.detach().masked_fill(~cands.valid, float("-inf")).topk(settings.top_k, dim=-1).indices  # (b, k)
    seq_top = _seq_logprob(models.generator, batch, _select(cands.passages, top), False)  # (b, k)
    gen = torch.zeros_like(prior_logits).scatter(1, top, seq_top)  # (b, c)
    loss, diag = vrag_loss(
        prior_logits,
        post_logits,
        gen,
        posterior_topk=settings.top_k,
        beta=settings.vrag_beta,
        temperature=settings.jsa.retriever_temperature,
        candidate_mask=cands.valid,
    )
    return StepOutput(loss, diag)


def _visited_columns(states: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """(b, m) distinct column indices per row: the visited candidates first, then unvisited ones as
    padding up to the row with most visits, so no index repeats within a row (a scatter back
    then routes each gradient once)."""
    visited = visited_mask(states, num_candidates)  # (b, c)
    m = int(visited.sum(-1).max())
    order = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True)  # visited columns first
    return order[:, :m]


def jsa_step(
    models: StepModels,
    index: Index,
    batch: Batch,
    settings: StepSettings,
    cache: JSAChainCache | None = None,
    rng: torch.Generator | None = None,
    **_,
) -> StepOutput:
    """JSA-RAG: MIS over the union from the cached chain state, loss on the visited states.

    1. union U of the prior and posterior top-Ks; 2. log p(y|x,z) for all of U without grad;
    3. MIS with target p(z|x) p(y|x,z) and proposal q(z|x,y), chains started from ``cache``;
    4. -log p(y|x,z) - log p(z|x) - log q(z|x,y) averaged over the chain's states, with the
    generator re-run with grad on the distinct visited passages only.
    """
    q, qp, cands = _prior_posterior_candidates(models, index, batch, settings.top_k)
    prior_logits, post_logits = _scores(q, cands), _scores(qp, cands)  # (b, c)
    with torch.no_grad():
        seq_all = _seq_logprob(models.generator_raw, batch, cands.passages, settings.jsa.length_normalize)  # (b, c)
    log_target, log_proposal = jsa_mis_inputs(
        seq_all.float(),
        prior_logits,
        post_logits,
        temperature=settings.jsa.retriever_temperature,
        candidate_mask=cands.valid,
    )
    init = cache.get(batch.ids, cands.ids).to(log_target.device) if cache is not None else None
    states, accepted = mis_sample(log_target, log_proposal, settings.jsa.num_proposals, init=init, generator=rng)
    if cache is not None:
        cache.update(batch.ids, cands.ids, states[:, -1].cpu())
    seq = seq_all.float()
    if settings.train_generator:
        cols = _visited_columns(states, seq.shape[1])  # (b, m)
        seq_visited = _seq_logprob(
            models.generator, batch, _select(cands.passages, cols), settings.jsa.length_normalize
        )
        seq = seq.scatter(1, cols, seq_visited.float())  # grad only at visited (and padding) columns
    loss, diag = jsa_loss(
        seq,
        prior_logits,
        post_logits,
        states,
        accepted=accepted,
        temperature=settings.jsa.retriever_temperature,
        candidate_mask=cands.valid,
    )
    return StepOutput(loss, _merge(diag, union_size=cands.valid.float().sum(-1)))


def gumbel_rerank_step(
    models: StepModels, index: Index, batch: Batch, settings: StepSettings, rng: torch.Generator | None = None, **_
) -> StepOutput:
    """G-Rerank: reranker scores -> relaxed top-k mask -> FiD reader bias -> answer NLL.

    The retriever is fixed (candidates from the frozen query encoder); gradients reach the
    reranker through the mask, and the reader only when it is trainable.
    """
    if models.reranker is None:
        raise ValueError("gumbel-rerank needs a reranker (model.reranker)")
    with torch.no_grad():
        q = models.query_encoder_raw(batch.questions)
    cands = retrieve(index, q, settings.gumbel.candidates)
    w = models.reranker(batch.questions, cands.passages).float()  # (b, c)
    mask = relaxed_topk_mask(w, settings.gumbel.k, settings.gumbel.tau, generator=rng, method=settings.gumbel.method)
    bias = passage_attention_bias(mask)  # (b, c)
    tok, tmask = models.generator(batch.questions, cands.passages, batch.targets, fid=True, passage_log_mask=bias)
    loss, diag = gumbel_rerank_loss(tok, tmask, passage_mask=mask)
    return StepOutput(loss, diag)


STEP_FUNCTIONS: dict[str, Callable[..., StepOutput]] = {
    "rag-sequence": rag_marginal_step,
    "rag-token": rag_marginal_step,
    "emdr2": distill_step,
    "pdist": distill_step,
    "vrag": vrag_step,
    "jsa": jsa_step,
    "gumbel-rerank": gumbel_rerank_step,
}


def run_step(
    models: StepModels,
    index: Index,
    batch: Batch,
    settings: StepSettings,
    cache: JSAChainCache | None = None,
    rng: torch.Generator | None = None,
) -> StepOutput:
    """Dispatch to the estimator's step; the loss carries the graph, diagnostics are detached."""
    return STEP_FUNCTIONS[settings.estimator](models, index, batch, settings, cache=cache, rng=rng)


def trainable_roles(estimator: str, train_generator: bool, train_passage_encoder: bool = False) -> tuple[str, ...]:
    """Which models an estimator updates: the single source of truth for the loop's optimizer,
    DDP wrapping and checkpoint contents."""
    if estimator == "gumbel-rerank":
        if train_passage_encoder:
            raise ValueError("gumbel-rerank keeps the retriever fixed; train_passage_encoder does not apply")
        return ("reranker", "generator") if train_generator else ("reranker",)
    roles = ["query_encoder"] + (["passage_encoder"] if train_passage_encoder else [])
    if estimator in ("vrag", "jsa"):
        roles.append("posterior_encoder")
    if train_generator:
        roles.append("generator")
    return tuple(roles)
