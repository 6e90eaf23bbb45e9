"""RAG decoding: RAG-Token beam search and RAG-Sequence fast / thorough decoding (Lewis et al. 2020).

Model-agnostic, so it can be checked against brute-force enumeration. The generator is a step
function ``next_logprobs(rows[n], prefixes[n, t]) -> (n, v)`` giving log p(y_t | x, z_row, y_<t)
for the encoded (question, passage) pair ``rows[n]`` (rows index the B*K pairs, row = b*K + k)
and a decoder prefix that starts with ``bos_id`` (the decoder start token; BART's is ``</s>``).
``doc_logprobs[b, k]`` = log p(z_k | x) (log softmax of the retriever scores).

A hypothesis is finished when it emits ``eos_id`` or reaches ``max_new_tokens`` (then it is
scored as the truncated sequence, without an eos term). Scores are plain log-probabilities (no
length penalty), so with ``num_beams`` at least the number of possible prefixes the search is exact.
Returned token lists exclude ``bos_id`` and keep the final ``eos_id``: each score is the
log-probability of exactly that list.

The step function gets the whole prefix at every step (no key/value cache): answers are short,
and it keeps the interface one function. ``encoder_decoder_step_fn`` adapts a transformers
encoder-decoder model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: (rows (n,), targets (n, l), target_mask (n, l) bool) -> log p(targets | x, z_row) (n,)
SequenceLogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_NEG_INF = float("-inf")


@dataclass
class Generated:
    """Per question, hypotheses sorted by score (best first): token ids and log p(y|x) scores."""

    tokens: list[list[list[int]]]
    scores: list[list[float]]

    @property
    def best_tokens(self) -> list[list[int]]:
        return [hyps[0] for hyps in self.tokens]

    @property
    def best_scores(self) -> list[float]:
        return [scores[0] for scores in self.scores]


@dataclass
class _Beams:
    """Finished hypotheses per search group: tokens (g, n, max_new_tokens) padded, lengths (g, n),
    scores (g, n) (-inf for empty slots)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor

    def as_lists(self, group: int) -> list[tuple[tuple[int, ...], float]]:
        out = []
        rows = zip(self.tokens[group].tolist(), self.lengths[group].tolist(), self.scores[group].tolist())
        for tokens, length, score in rows:
            if score > _NEG_INF:
                out.append((tuple(tokens[:length]), score))
        return out


def _check_args(doc_logprobs: torch.Tensor, num_beams: int, max_new_tokens: int) -> None:
    if doc_logprobs.dim() != 2:
        raise ValueError(f"doc_logprobs: expected (b, k), got shape {tuple(doc_logprobs.shape)}")
    if num_beams < 1:
        raise ValueError(f"num_beams: must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")


def _merge_finished(fin: _Beams, tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor) -> _Beams:
    """Keep each group's best n of the finished and the newly ended hypotheses."""
    n = fin.scores.shape[1]
    all_scores = torch.cat([fin.scores, scores], dim=1)  # (g, n + m)
    top_scores, idx = all_scores.topk(n, dim=1)  # (g, n)
    all_tokens = torch.cat([fin.tokens, tokens], dim=1)
    all_lengths = torch.cat([fin.lengths, lengths], dim=1)
    top_tokens = all_tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, all_tokens.shape[-1]))
    return _Beams(top_tokens, all_lengths.gather(1, idx), top_scores)


def _take(prefixes: torch.Tensor, beam: torch.Tensor) -> torch.Tensor:
    """prefixes (g, n, t) of the chosen beams (g, m) -> (g, m, t)."""
    return prefixes.gather(1, beam.unsqueeze(-1).expand(-1, -1, prefixes.shape[-1]))


def _ended(
    prefixes: torch.Tensor, last: torch.Tensor, max_new_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finished token rows (g, m, max_new_tokens) from prefixes (g, m, 1 + t) (bos first) + last (g, m)."""
    g, m, t1 = prefixes.shape
    tokens = torch.full((g, m, max_new_tokens), pad_id, dtype=torch.long, device=prefixes.device)
    tokens[:, :, : t1 - 1] = prefixes[:, :, 1:]
    tokens[:, :, t1 - 1] = last
    return tokens, torch.full((g, m), t1, dtype=torch.long, device=prefixes.device)


def _beam_search(
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    groups: int,
    num_beams: int,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
) -> _Beams:
    """Beam search in ``groups`` independent searches. ``scorer(group_idx (m,), prefixes (m, t))
    -> (m, v)`` gives next-token log-probs of the live beams only. The search stops once no live
    beam can beat the n-th finished hypothesis (exact, since log-probs only fall)."""
    g, n = groups, num_beams
    prefixes = torch.full((g, n, 1), bos_id, dtype=torch.long, device=device)
    alive = torch.full((g, n), _NEG_INF, device=device)
    alive[:, 0] = 0.0  # one live beam at first, so the n beams never duplicate
    fin = _Beams(
        torch.full((g, n, max_new_tokens), pad_id, dtype=torch.long, device=device),
        torch.zeros((g, n), dtype=torch.long, device=device),
        torch.full((g, n), _NEG_INF, device=device),
    )
    for t in range(max_new_tokens):
        live = alive > _NEG_INF  # (g, n)
        group_idx = torch.arange(g, device=device).unsqueeze(1).expand(g, n)[live]  # (m,)
        step_logprobs = scorer(group_idx, prefixes[live]).float()  # (m, v)
        v = step_logprobs.shape[-1]
        if not 0 <= eos_id < v:
            raise ValueError(f"eos_id: {eos_id} is outside the vocabulary of size {v}")
        logprobs = torch.full((g, n, v), _NEG_INF, device=device)
        logprobs[live] = step_logprobs
        candidates = alive.unsqueeze(-1) + logprobs  # (g, n, v)
        if t == max_new_tokens - 1:  # every extension ends here: keep the best n of them
            scores, flat = candidates.reshape(g, n * v).topk(n, dim=1)  # (g, n)
            beam, token = flat // v, flat % v
            tokens, lengths = _ended(_take(prefixes, beam), token, max_new_tokens, pad_id)
            return _merge_finished(fin, tokens, lengths, scores)
        # An eos extension finishes when it ranks among this step's top n candidates (so one
        # beam is exactly greedy); the live beams are the top n non-eos extensions.
        top_scores, flat = candidates.reshape(g, n * v).topk(n, dim=1)  # (g, n)
        ended_scores = torch.where(flat % v == eos_id, top_scores, torch.full_like(top_scores, _NEG_INF))
        eos = torch.full((g, n), eos_id, device=device)
        eos_tokens, eos_lengths = _ended(_take(prefixes, flat // v), eos, max_new_tokens, pad_id)
        fin = _merge_finished(fin, eos_tokens, eos_lengths, ended_scores)
        candidates[:, :, eos_id] = _NEG_INF
        alive, flat = candidates.reshape(g, n * v).topk(n, dim=1)  # (g, n)
        beam, token = flat // v, flat % v
        prefixes = torch.cat([_take(prefixes, beam), token.unsqueeze(-1)], dim=-1)  # (g, n, t + 2)
        if bool((alive.max(dim=1).values <= fin.scores.min(dim=1).values).all()):
            break  # log-probs only fall: no live beam can enter any group's finished top n
    return fin


def _sorted(
    hyps: list[tuple[tuple[int, ...], float]], num_return_sequences: int | None
) -> tuple[list[list[int]], list[float]]:
    hyps = sorted(hyps, key=lambda h: -h[1])[:num_return_sequences]
    return [list(tokens) for tokens, _ in hyps], [score for _, score in hyps]


def _collect(per_question: list[list[tuple[tuple[int, ...], float]]], num_return_sequences: int | None) -> Generated:
    pairs = [_sorted(hyps, num_return_sequences) for hyps in per_question]
    return Generated([p[0] for p in pairs], [p[1] for p in pairs])


@torch.no_grad()
def rag_token_generate(
    next_logprobs: StepFn,
    doc_logprobs: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
    num_return_sequences: int | None = None,
) -> Generated:
    """RAG-Token decoding: beam search (greedy when ``num_beams=1``) over the marginal

        p(y_t | x, y_<t) = sum_k p(z_k | x) p(y_t | x, z_k, y_<t)

    Scores are log p(y|x) = sum_t log of that marginal. Returns up to ``num_beams`` hypotheses
    per question (``num_return_sequences`` caps it).
    """
    _check_args(doc_logprobs, num_beams, max_new_tokens)
    b, k = doc_logprobs.shape
    doc_lp = doc_logprobs.float()
    passages = torch.arange(k, device=doc_logprobs.device)

    def marginal(questions: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        m, t = prefixes.shape
        rows = (questions.unsqueeze(1) * k + passages).reshape(-1)  # (m * k,)
        per_passage = next_logprobs(rows, prefixes.repeat_interleave(k, dim=0)).float().view(m, k, -1)
        return torch.logsumexp(doc_lp[questions].unsqueeze(-1) + per_passage, dim=1)  # (m, v)

    fin = _beam_search(marginal, b, num_beams, max_new_tokens, bos_id, eos_id, pad_id, doc_logprobs.device)
    return _collect([fin.as_lists(q) for q in range(b)], num_return_sequences)


def _per_passage_hypotheses(
    next_logprobs: StepFn,
    b: int,
    k: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    num_beams: int,
    device: torch.device,
) -> list[list[dict[tuple[int, ...], float]]]:
    """[question][passage] -> {tokens: log p(y | x, z_k)} from one beam search per passage."""
    fin = _beam_search(next_logprobs, b * k, num_beams, max_new_tokens, bos_id, eos_id, pad_id, device)
    return [[dict(fin.as_lists(q * k + j)) for j in range(k)] for q in range(b)]


@torch.no_grad()
def rag_sequence_fast_generate(
    next_logprobs: StepFn,
    doc_logprobs: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
    num_return_sequences: int | None = None,
) -> Generated:
    """RAG-Sequence fast decoding: beam search under each passage alone, then the union Y of the
    hypotheses, each scored

        log sum_{k : y in beam(k)} p(z_k | x) p(y | x, z_k)

    i.e. a passage whose beam did not produce y counts as p(y | x, z_k) = 0 (no extra forward
    pass). A lower bound of the thorough score.
    """
    _check_args(doc_logprobs, num_beams, max_new_tokens)
    b, k = doc_logprobs.shape
    beams = _per_passage_hypotheses(
        next_logprobs, b, k, bos_id, eos_id, pad_id, max_new_tokens, num_beams, doc_logprobs.device
    )
    doc_lp = doc_logprobs.float().tolist()
    per_question = []
    for q in range(b):
        union: dict[tuple[int, ...], list[float]] = {}
        for j, hyps in enumerate(beams[q]):
            for tokens, score in hyps.items():
                union.setdefault(tokens, []).append(doc_lp[q][j] + score)
        per_question.append([(tokens, torch.tensor(terms).logsumexp(0).item()) for tokens, terms in union.items()])
    return _collect(per_question, num_return_sequences)


@torch.no_grad()
def rag_sequence_thorough_generate(
    next_logprobs: StepFn,
    doc_logprobs: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
    num_return_sequences: int | None = None,
    sequence_logprob: SequenceLogprobFn | None = None,
) -> Generated:
    """RAG-Sequence thorough decoding: the fast candidate set, but every candidate y is scored
    under every passage (an extra teacher-forced pass) and marginalised exactly:

        log p(y | x) = log sum_k p(z_k | x) p(y | x, z_k)

    ``sequence_logprob(rows, targets, target_mask)`` scores the candidates in one pass per
    (candidate, passage) pair; without it, ``teacher_forced_logprob`` runs the step function
    once per target position.
    """
    _check_args(doc_logprobs, num_beams, max_new_tokens)
    b, k = doc_logprobs.shape
    device = doc_logprobs.device
    beams = _per_passage_hypotheses(next_logprobs, b, k, bos_id, eos_id, pad_id, max_new_tokens, num_beams, device)
    candidates = [sorted({tokens for hyps in beams[q] for tokens in hyps}) for q in range(b)]
    owners = torch.tensor([q for q in range(b) for _ in candidates[q]], dtype=torch.long, device=device)  # (c,)
    flat = [tokens for q in range(b) for tokens in candidates[q]]
    length = max(len(tokens) for tokens in flat)
    targets = torch.full((len(flat), length), pad_id, dtype=torch.long, device=device)
    target_mask = torch.zeros((len(flat), length), dtype=torch.bool, device=device)
    for i, tokens in enumerate(flat):
        targets[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        target_mask[i, : len(tokens)] = True
    rows = (owners.unsqueeze(1) * k + torch.arange(k, device=device)).reshape(-1)  # (c * k,)
    score_fn = sequence_logprob or (lambda r, y, m: teacher_forced_logprob(next_logprobs, r, y, m, bos_id=bos_id))
    per_pair = score_fn(rows, targets.repeat_interleave(k, dim=0), target_mask.repeat_interleave(k, dim=0))
    marginal = torch.logsumexp(doc_logprobs.float()[owners] + per_pair.float().view(-1, k), dim=1)  # (c,)
    scores, i = marginal.tolist(), 0
    per_question = []
    for q in range(b):
        per_question.append([(tokens, scores[i + j]) for j, tokens in enumerate(candidates[q])])
        i += len(candidates[q])
    return _collect(per_question, num_return_sequences)


@torch.no_grad()
def teacher_forced_logprob(
    next_logprobs: StepFn,
    rows: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    bos_id: int,
) -> torch.Tensor:
    """log p(targets | x, z_row) (n,) through the step function, one call per target position
    (only for the rows whose target is that long)."""
    n, length = targets.shape
    prefixes = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long, device=targets.device), targets], dim=1)
    total = torch.zeros(n, device=targets.device)
    for t in range(length):
        active = target_mask[:, t].nonzero().squeeze(1)  # (m,)
        if active.numel() == 0:
            continue
        logprobs = next_logprobs(rows[active], prefixes[active, : t + 1]).float()  # (m, v)
        total[active] += logprobs.gather(1, targets[active, t : t + 1]).squeeze(1)
    return total


def encoder_decoder_step_fn(
    model: torch.nn.Module, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor
) -> StepFn:
    """A step function over a transformers encoder-decoder (BART, T5) whose encoder already ran on
    the B*K (question, passage) inputs: encoder_hidden_states (b*k, s, d), mask (b*k, s)."""
    from transformers.modeling_outputs import BaseModelOutput

    def step(rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states[rows]),
            attention_mask=encoder_attention_mask[rows],
            decoder_input_ids=prefixes,
            use_cache=False,
        )
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (n, v)

    return step


def encoder_decoder_sequence_logprob_fn(
    model: torch.nn.Module, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor, *, bos_id: int
) -> SequenceLogprobFn:
    """``sequence_logprob`` for thorough decoding: one teacher-forced decoder pass per pair."""
    from transformers.modeling_outputs import BaseModelOutput

    def score(rows: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(targets[:, :1], bos_id)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states[rows]),
            attention_mask=encoder_attention_mask[rows],
            decoder_input_ids=torch.cat([start, targets[:, :-1]], dim=1),
            use_cache=False,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (logprobs * target_mask).sum(-1)  # (n,)

    return score


#: The three decodings by name (``raggen.names.DecodingName``).
DECODERS: dict[str, Callable[..., Generated]] = {
    "rag-token": rag_token_generate,
    "rag-sequence-fast": rag_sequence_fast_generate,
    "rag-sequence-thorough": rag_sequence_thorough_generate,
}


def generate_tokens(
    generator,
    questions: list[str],
    passages: list[list[str]],
    doc_logprobs: torch.Tensor,
    *,
    decoding: str,
    max_new_tokens: int,
    num_beams: int = 1,
    on_prefix: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """The one dispatcher eval and Serve share: each question's best token ids (without the start
    token, with the final EOS if any) over its K passages, ``doc_logprobs`` (b, k) = log p(z|x).

    ``generator`` is a :class:`raggen.models.Generator` (``encode``, ``step_fn``,
    ``sequence_logprob``, ``bos_id``/``eos_id``/``pad_id``). Thorough decoding rescores candidates
    with one teacher-forced pass per (candidate, passage), whose EOS-based mask equals the decoder's
    unless pad == eos (GPT-2); there the step-function fallback is used. ``on_prefix`` (one
    question, greedy RAG-Token only) sees the committed prefix (start token first) before every
    step, so an answer can stream while it is decoded.
    """
    if decoding not in DECODERS:
        raise ValueError(f"decoding: expected one of {tuple(DECODERS)}, got {decoding!r}")
    if on_prefix is not None and (len(questions) != 1 or decoding != "rag-token" or num_beams != 1):
        raise ValueError("on_prefix needs one question decoded with rag-token and num_beams=1")
    encoded = generator.encode(list(questions), passages)
    kwargs: dict = dict(bos_id=generator.bos_id, eos_id=generator.eos_id, pad_id=generator.pad_id,
                        max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=1)  # fmt: skip
    if decoding == "rag-sequence-thorough" and generator.pad_id != generator.eos_id:
        kwargs["sequence_logprob"] = lambda rows, targets, mask: generator.sequence_logprob(encoded, rows, targets)
    step = generator.step_fn(encoded)
    if on_prefix is not None:
        inner = step

        def step(rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
            on_prefix(prefixes[0].tolist())  # greedy RAG-Token: the k rows are the one live hypothesis
            return inner(rows, prefixes)

    return DECODERS[decoding](step, doc_logprobs.to(generator.device), **kwargs).best_tokens
