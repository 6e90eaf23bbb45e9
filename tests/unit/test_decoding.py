"""RAG decoding against brute-force enumeration of every answer on a toy step function."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from raggen.decoding import (
    encoder_decoder_sequence_logprob_fn,
    encoder_decoder_step_fn,
    rag_sequence_fast_generate,
    rag_sequence_thorough_generate,
    rag_token_generate,
    teacher_forced_logprob,
)

V, T, B, K = 5, 3, 2, 3
BOS, EOS, PAD = 0, 1, 2  # BOS and PAD are ordinary tokens to the toy model


class ToyModel:
    """log p(y_t | x, z_row, y_<t) from a random table indexed by (row, prefix after bos)."""

    def __init__(self, seed: int, rows: int = B * K, sharpness: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.offsets = [sum(V**i for i in range(length)) for length in range(T + 1)]
        logits = sharpness * torch.randn(rows, self.offsets[T], V, generator=g, dtype=torch.float64)
        self.table = torch.log_softmax(logits, -1)  # (rows, prefixes, v)
        self.calls = 0

    def prefix_index(self, prefixes: torch.Tensor) -> torch.Tensor:
        body = prefixes[:, 1:]  # (n, t - 1)
        weights = V ** torch.arange(body.shape[1] - 1, -1, -1)
        return self.offsets[body.shape[1]] + (body * weights).sum(-1)

    def __call__(self, rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        assert (prefixes[:, 0] == BOS).all() and rows.dim() == 1 and prefixes.shape[0] == rows.shape[0]
        self.calls += 1
        return self.table[rows, self.prefix_index(prefixes)]

    def token_logprobs(self, row: int, tokens: tuple[int, ...]) -> list[float]:
        return [self.next_row(row, tokens[:t])[tokens[t]].item() for t in range(len(tokens))]

    def next_row(self, row: int, prefix: tuple[int, ...]) -> torch.Tensor:
        """log p(. | x, z_row, prefix) (v,)."""
        return self.table[row, self.prefix_index(torch.tensor([[BOS, *prefix]]))[0]]


def all_answers() -> list[tuple[int, ...]]:
    """Every finished answer: eos-terminated up to T tokens, or T tokens without eos (truncated)."""
    body = [v for v in range(V) if v != EOS]
    ended = [(*p, EOS) for length in range(T) for p in itertools.product(body, repeat=length)]
    return ended + list(itertools.product(body, repeat=T))


def brute_force(model: ToyModel, doc_logprobs: torch.Tensor, kind: str) -> list[dict[tuple[int, ...], float]]:
    out = []
    for b in range(doc_logprobs.shape[0]):
        scores = {}
        for y in all_answers():
            per_passage = torch.tensor(
                [model.token_logprobs(b * K + k, y) for k in range(K)], dtype=torch.float64
            )  # (k, t)
            prior = doc_logprobs[b].double().unsqueeze(1)
            if kind == "sequence":
                scores[y] = torch.logsumexp(prior.squeeze(1) + per_passage.sum(1), 0).item()
            else:
                scores[y] = torch.logsumexp(prior + per_passage, 0).sum().item()
        out.append(scores)
    return out


@pytest.fixture(params=[0, 1])
def setup(request):
    model = ToyModel(request.param)
    g = torch.Generator().manual_seed(100 + request.param)
    doc_logprobs = torch.log_softmax(torch.randn(B, K, generator=g, dtype=torch.float64), -1)
    return model, doc_logprobs


KW = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=T)


def test_all_answers_form_a_distribution(setup):
    model, doc_logprobs = setup
    for kind in ("sequence", "token"):
        for scores in brute_force(model, doc_logprobs, kind):
            total = torch.tensor(list(scores.values()), dtype=torch.float64).logsumexp(0).item()
            assert total == pytest.approx(0.0, abs=1e-9)


def test_rag_token_wide_beam_is_exact(setup):
    model, doc_logprobs = setup
    out = rag_token_generate(model, doc_logprobs, num_beams=V**T, **KW)
    for b, exact in enumerate(brute_force(model, doc_logprobs, "token")):
        ranked = sorted(exact.items(), key=lambda kv: -kv[1])
        assert [tuple(y) for y in out.tokens[b]] == [y for y, _ in ranked]  # every answer, in order
        expected = torch.tensor([s for _, s in ranked], dtype=torch.float32)
        torch.testing.assert_close(torch.tensor(out.scores[b]), expected)


def test_rag_token_greedy_follows_the_marginal_argmax(setup):
    model, doc_logprobs = setup
    out = rag_token_generate(model, doc_logprobs, num_beams=1, **KW)
    exact = brute_force(model, doc_logprobs, "token")
    for b in range(B):
        prefix: tuple[int, ...] = ()
        while len(prefix) < T and (not prefix or prefix[-1] != EOS):
            step = torch.stack([model.next_row(b * K + k, prefix) for k in range(K)])  # (k, v)
            prefix += (int(torch.logsumexp(doc_logprobs[b].double().unsqueeze(1) + step, 0).argmax()),)
        assert tuple(out.best_tokens[b]) == prefix
        assert out.best_scores[b] == pytest.approx(exact[b][prefix], abs=1e-5)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_rag_token_narrow_beam_scores_are_true_marginals(setup, num_beams):
    model, doc_logprobs = setup
    out = rag_token_generate(model, doc_logprobs, num_beams=num_beams, num_return_sequences=2, **KW)
    for b, exact in enumerate(brute_force(model, doc_logprobs, "token")):
        assert len(out.tokens[b]) == 2 and out.scores[b][0] >= out.scores[b][1]
        for y, score in zip(out.tokens[b], out.scores[b]):
            assert score == pytest.approx(exact[tuple(y)], abs=1e-5)
        assert out.scores[b][0] <= max(exact.values()) + 1e-5


def test_rag_sequence_fast_with_a_wide_beam_is_exact(setup):
    model, doc_logprobs = setup
    out = rag_sequence_fast_generate(model, doc_logprobs, num_beams=V**T, **KW)
    for b, exact in enumerate(brute_force(model, doc_logprobs, "sequence")):
        assert {tuple(y) for y in out.tokens[b]} == set(exact)
        for y, score in zip(out.tokens[b], out.scores[b]):
            assert score == pytest.approx(exact[tuple(y)], abs=1e-5)
        assert tuple(out.best_tokens[b]) == max(exact, key=exact.get)


def _passage_beams(model: ToyModel, num_beams: int) -> list[list[set[tuple[int, ...]]]]:
    """Each passage's own beam (K=1 fast decoding per row, prior log 1 = 0)."""
    beams = []
    for b in range(B):
        row_sets = []
        for k in range(K):

            def single(rows, prefixes, row=b * K + k):
                return model(torch.full_like(rows, row), prefixes)

            out = rag_sequence_fast_generate(single, torch.zeros(1, 1), num_beams=num_beams, **KW)
            row_sets.append({tuple(y) for y in out.tokens[0]})
        beams.append(row_sets)
    return beams


@pytest.mark.parametrize("num_beams", [1, 2])
def test_thorough_scores_are_exact_marginals_and_fast_scores_count_only_producing_passages(setup, num_beams):
    model, doc_logprobs = setup
    fast = rag_sequence_fast_generate(model, doc_logprobs, num_beams=num_beams, **KW)
    thorough = rag_sequence_thorough_generate(model, doc_logprobs, num_beams=num_beams, **KW)
    beams = _passage_beams(model, num_beams)
    exact = brute_force(model, doc_logprobs, "sequence")
    strictly_lower = 0
    for b in range(B):
        union = set().union(*beams[b])
        assert {tuple(y) for y in thorough.tokens[b]} == union == {tuple(y) for y in fast.tokens[b]}
        thorough_scores = {tuple(y): s for y, s in zip(thorough.tokens[b], thorough.scores[b])}
        for y, score in zip(fast.tokens[b], fast.scores[b]):
            y = tuple(y)
            assert thorough_scores[y] == pytest.approx(exact[b][y], abs=1e-5)
            producing = [k for k in range(K) if y in beams[b][k]]
            expected_fast = torch.logsumexp(
                torch.tensor([doc_logprobs[b, k].item() + sum(model.token_logprobs(b * K + k, y)) for k in producing]),
                0,
            ).item()
            assert score == pytest.approx(expected_fast, abs=1e-5)
            assert score <= thorough_scores[y] + 1e-6
            strictly_lower += score < thorough_scores[y] - 1e-4
        assert thorough.scores[b] == sorted(thorough.scores[b], reverse=True)
    assert strictly_lower > 0  # the two decoders do differ on this toy model


def test_greedy_per_passage_beam_follows_that_passage_argmax(setup):
    model, _ = setup
    beams = _passage_beams(model, 1)
    for b in range(B):
        for k in range(K):
            prefix: tuple[int, ...] = ()
            while len(prefix) < T and (not prefix or prefix[-1] != EOS):
                prefix += (int(model.next_row(b * K + k, prefix).argmax()),)
            assert beams[b][k] == {prefix}


def test_teacher_forced_logprob_matches_the_table(setup):
    model, _ = setup
    answers = [(3, 4, EOS), (EOS,), (0, 2, 3)]
    rows = torch.tensor([0, 4, 5])
    targets = torch.tensor([[3, 4, EOS], [EOS, PAD, PAD], [0, 2, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    got = teacher_forced_logprob(model, rows, targets, mask, bos_id=BOS)
    expected = [sum(model.token_logprobs(r, y)) for r, y in zip(rows.tolist(), answers)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("fn", [rag_token_generate, rag_sequence_fast_generate, rag_sequence_thorough_generate])
def test_bad_arguments_raise(setup, fn):
    model, doc_logprobs = setup
    with pytest.raises(ValueError):
        fn(model, doc_logprobs, num_beams=0, **KW)
    with pytest.raises(ValueError):
        fn(model, doc_logprobs[0], **KW)
    with pytest.raises(ValueError):
        fn(model, doc_logprobs, **{**KW, "max_new_tokens": 0})
    with pytest.raises(ValueError):
        fn(model, doc_logprobs, **{**KW, "eos_id": V})


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_transformers_adaptors_agree_and_drive_every_decoder(one_thread):
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    model = BartForConditionalGeneration(config).eval()
    inputs = torch.randint(3, 40, (B * K, 7))
    mask = torch.ones_like(inputs)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=inputs, attention_mask=mask).last_hidden_state
    step = encoder_decoder_step_fn(model, hidden, mask)
    score = encoder_decoder_sequence_logprob_fn(model, hidden, mask, bos_id=2)
    doc_logprobs = torch.log_softmax(torch.randn(B, K), -1)
    kw = dict(bos_id=2, eos_id=2, pad_id=1, max_new_tokens=4, num_beams=2)
    one_pass = rag_sequence_thorough_generate(step, doc_logprobs, sequence_logprob=score, **kw)
    stepwise = rag_sequence_thorough_generate(step, doc_logprobs, **kw)
    assert one_pass.tokens == stepwise.tokens
    torch.testing.assert_close(torch.tensor(one_pass.scores), torch.tensor(stepwise.scores), atol=1e-4, rtol=0)
    fast = rag_sequence_fast_generate(step, doc_logprobs, **kw)
    token = rag_token_generate(step, doc_logprobs, **kw)
    for out in (fast, token):
        assert all(1 <= len(y) <= 4 for hyps in out.tokens for y in hyps)
        assert all(s <= 0 for scores in out.scores for s in scores)
