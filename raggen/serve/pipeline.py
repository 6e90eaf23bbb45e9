"""The pipeline stages as plain functions: retrieve, rerank, generate (and generate step by step).

The Serve deployments (:mod:`raggen.serve.deployments`) run these in a thread per ``@serve.batch``
call; benchmarks/serve.py runs them in-process as the same-run baseline.

Streaming (``POST /v1/chat/completions`` with ``stream: true``): RAG-Token decoding with one beam
(greedy) commits a token at every step: the prefix the step function is asked about at step t
is the answer's first t tokens, never revised. :func:`decode_tokens` can report those prefixes
(``on_prefix``), so the answer streams as it is decoded. Beam search (and RAG-Sequence, which
rescores whole hypotheses at the end) knows its answer only when the search ends; those stream
the finished answer token by token (:func:`streams_while_decoding` tells which).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch

from raggen.decoding import generate_tokens
from raggen.models import Generator as GeneratorModel
from raggen.models import Reranker as RerankerModel
from raggen.models import TextEncoder, passage_text
from raggen.retrieval.search import Hit, hits, search_passages
from raggen.serve.live_index import LiveIndex


class Generation(TypedDict):
    """One answer: its text, how many tokens were generated, and why decoding stopped."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (the answer ended with EOS) or "length" (max_new_tokens reached)


def retrieve_batch(
    encoder: TextEncoder,
    live: LiveIndex,
    questions: list[str],
    top_ks: list[int],
    modes: list[str | None] | None = None,
    retrieval: Any = None,
) -> list[list[Hit]]:
    """Top-k passages of each question from one index version (one encoder pass, one search per
    retrieval mode in the batch; the shards in this process or in shard actors: only the k hits'
    texts come back, no vectors). ``modes``: each row's dense | sparse | hybrid (None: the
    service's, ``retrieval``, a ``raggen.retrieval.RetrievalSettings``); they need ``live.index``
    to be a ``raggen.retrieval.HybridIndex`` (what :func:`load_live_index` makes)."""
    xq = encoder.encode(list(questions), prefix=encoder.query_prefix_for(live.query_prefix)).numpy()  # (b, d) float32
    default = retrieval.mode if retrieval is not None else "dense"
    wanted = [m or default for m in (modes or [None] * len(questions))]
    if set(wanted) == {"dense"}:  # any index's plain search
        return hits(search_passages(live.index, xq, max(top_ks), mode="dense"), top_ks)
    out: list[list[Hit]] = [[] for _ in questions]
    for mode, rows in _groups(wanted).items():
        result = search_passages(
            live.index,
            xq[rows],
            max(top_ks[r] for r in rows),
            questions=[questions[r] for r in rows],
            mode=mode,
            settings=retrieval,
        )
        for r, row_hits in zip(rows, hits(result, [top_ks[r] for r in rows])):
            out[r] = row_hits
    return out


def _groups(keys: list[Any]) -> dict[Any, list[int]]:
    """Row numbers by key, so rows that can share one rectangular model pass run together."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        groups[key].append(row)
    return groups


@torch.no_grad()
def rerank_batch(
    reranker: RerankerModel, questions: list[str], candidates: list[list[Hit]], top_ks: list[int]
) -> list[list[Hit]]:
    """Re-score each question's candidates with the cross-encoder; keep its top_k by that score."""
    out: list[list[Hit]] = [[] for _ in questions]
    for c, rows in _groups([len(cands) for cands in candidates]).items():
        if c == 0:
            continue
        texts = [[passage_text(h["title"], h["text"]) for h in candidates[r]] for r in rows]
        scores = reranker.score([questions[r] for r in rows], texts)  # (n, c)
        for n, r in enumerate(rows):
            order = torch.argsort(scores[n], descending=True)[: top_ks[r]].tolist()
            out[r] = [{**candidates[r][j], "score": float(scores[n, j])} for j in order]
    return out


def streams_while_decoding(decoding: str, num_beams: int) -> bool:
    """Whether the decoder commits tokens step by step (RAG-Token greedy), so the answer can stream
    while it is decoded; otherwise it streams once decoding ends."""
    return decoding == "rag-token" and num_beams == 1


@torch.no_grad()
def decode_tokens(
    generator: GeneratorModel,
    questions: list[str],
    hits: list[list[Hit]],
    decoding: str,
    max_new_tokens: int,
    num_beams: int,
    on_prefix: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """One decoding over b questions with k passages each; p(z|x) = softmax of the passage scores.

    Returns each question's best token ids (without the start token, with the final EOS if any).
    ``on_prefix`` (one question, :func:`streams_while_decoding` only) is called with the committed
    prefix (start token first) before every decoding step.
    """
    texts = [[passage_text(h["title"], h["text"]) for h in row] for row in hits]
    scores = torch.tensor([[h["score"] for h in row] for row in hits], dtype=torch.float32)  # (b, k)
    return generate_tokens(generator, list(questions), texts, torch.log_softmax(scores, dim=-1), decoding=decoding,
                           max_new_tokens=max_new_tokens, num_beams=num_beams, on_prefix=on_prefix)  # fmt: skip


def decode_answers(
    generator: GeneratorModel,
    questions: list[str],
    hits: list[list[Hit]],
    decoding: str,
    max_new_tokens: int,
    num_beams: int,
) -> list[str]:
    """:func:`decode_tokens` as text."""
    tokens = decode_tokens(generator, questions, hits, decoding, max_new_tokens, num_beams)
    return [generator.decode(t) for t in tokens]


def generation_of(generator: GeneratorModel, tokens: Sequence[int], max_new_tokens: int) -> Generation:
    """The text of ``tokens`` and why decoding stopped there."""
    tokens = list(tokens)
    ended = generator.eos_id in tokens
    count = tokens.index(generator.eos_id) if ended else len(tokens)
    reason = "stop" if ended or len(tokens) < max_new_tokens else "length"
    return Generation(text=generator.decode(tokens), completion_tokens=count, finish_reason=reason)


def _per_row(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


@torch.no_grad()
def generate_outputs(
    generator: GeneratorModel,
    questions: list[str],
    hits: list[list[Hit]],
    decodings: list[str],
    max_new_tokens: list[int],
    num_beams: int | Sequence[int],
) -> list[Generation]:
    """Answers for a mixed batch: rows with the same (decoding, k, max_new_tokens, num_beams) decode together.

    ``num_beams`` is one width for every row or one per row.
    """
    beams = _per_row(num_beams, len(questions))
    out = [Generation(text="", completion_tokens=0, finish_reason="stop") for _ in questions]  # no passages: ""
    keys = [(d, len(h), m, nb) for d, h, m, nb in zip(decodings, hits, max_new_tokens, beams)]
    for (decoding, k, max_new, nb), rows in _groups(keys).items():
        if k == 0:
            continue
        tokens = decode_tokens(generator, [questions[r] for r in rows], [hits[r] for r in rows], decoding, max_new, nb)
        for r, t in zip(rows, tokens):
            out[r] = generation_of(generator, t, max_new)
    return out


def generate_batch(
    generator: GeneratorModel,
    questions: list[str],
    hits: list[list[Hit]],
    decodings: list[str],
    max_new_tokens: list[int],
    num_beams: int | Sequence[int],
) -> list[str]:
    """:func:`generate_outputs`' texts."""
    return [g["text"] for g in generate_outputs(generator, questions, hits, decodings, max_new_tokens, num_beams)]


class TextDeltas:
    """Turns growing token prefixes into the text pieces to send: each piece extends what was sent.

    ``decode`` is the generator's (it strips, cuts at EOS); a prefix that ends inside a multi-byte
    character (U+FFFD at the end) is held back until the character is complete.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.sent = ""

    def update(self, tokens: Sequence[int]) -> str:
        text = self._decode(list(tokens)).rstrip("\ufffd")
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, text: str) -> str:
        """The rest of the final answer ``text`` (empty if the pieces sent already diverged from it)."""
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def pieces(self, tokens: Sequence[int]) -> list[str]:
        """The pieces of a finished answer, one per token (what a step-by-step stream would have sent)."""
        tokens = list(tokens)
        out = [self.update(tokens[: n + 1]) for n in range(len(tokens))]
        return [p for p in out if p]
