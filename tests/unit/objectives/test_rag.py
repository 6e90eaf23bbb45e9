"""RAG-Sequence / RAG-Token NLLs against brute-force enumeration and transformers' get_nll."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

from raggen.objectives import rag_sequence_loss, rag_sequence_nll, rag_token_loss, rag_token_nll

BOS, PAD, EOS, V, K = 0, 1, 2, 40, 3


def _random_case(seed: int, b: int = 3, k: int = 4, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    doc_scores = torch.randn(b, k, generator=g, dtype=torch.float64)
    token_logprobs = torch.log_softmax(torch.randn(b, k, t, 7, generator=g, dtype=torch.float64), -1)[..., 0]
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (b, t)
    return doc_scores, token_logprobs, mask


def _brute_force(doc_scores, token_logprobs, mask, per_token: bool) -> torch.Tensor:
    """Explicit sums of probabilities, no logsumexp: the definitions of the two models."""
    out = []
    for b in range(doc_scores.shape[0]):
        prior = [math.exp(s) for s in doc_scores[b].tolist()]
        prior = [p / sum(prior) for p in prior]
        k_range, positions = range(len(prior)), [t for t in range(mask.shape[1]) if mask[b, t]]
        if per_token:
            prob = 1.0
            for t in positions:
                prob *= sum(prior[k] * math.exp(token_logprobs[b, k, t].item()) for k in k_range)
        else:
            prob = sum(
                prior[k] * math.prod(math.exp(token_logprobs[b, k, t].item()) for t in positions) for k in k_range
            )
        out.append(-math.log(prob))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rag_sequence_matches_brute_force(seed):
    case = _random_case(seed)
    torch.testing.assert_close(rag_sequence_nll(*case), _brute_force(*case, per_token=False))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rag_token_matches_brute_force(seed):
    case = _random_case(seed)
    torch.testing.assert_close(rag_token_nll(*case), _brute_force(*case, per_token=True))


def test_single_token_targets_make_both_models_agree():
    # With one target token there is no difference between one passage per sequence or per token.
    doc_scores, token_logprobs, _ = _random_case(3, t=1)
    mask = torch.ones(doc_scores.shape[0], 1, dtype=torch.bool)
    torch.testing.assert_close(
        rag_sequence_nll(doc_scores, token_logprobs, mask), rag_token_nll(doc_scores, token_logprobs, mask)
    )


def test_float_and_bool_masks_agree_and_padding_is_ignored():
    doc_scores, token_logprobs, mask = _random_case(4)
    garbage = token_logprobs.masked_fill(~mask.unsqueeze(1), -1e4)  # padding positions must not count
    for fn in (rag_sequence_nll, rag_token_nll):
        torch.testing.assert_close(fn(doc_scores, garbage, mask), fn(doc_scores, token_logprobs, mask.double()))


def _tiny_rag_config() -> RagConfig:
    question = DPRConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    generator = BartConfig(
        vocab_size=V,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
    )
    return RagConfig.from_question_encoder_generator_configs(question, generator, n_docs=K)


@pytest.fixture(scope="module")
def hf_models():
    config = _tiny_rag_config()
    return RagSequenceForGeneration(config=config).eval(), RagTokenForGeneration(config=config).eval()


def _hf_case(seed: int, leading: list[int], b: int = 3, t: int = 7):
    """seq_logits (b*k, t, v), doc_scores (b, k), target (b, t) as RAG builds them; target starts
    with ``leading`` and ends with padding of a different length per row.

    Every row keeps >= 2 scored positions: get_nll adds the doc log-prior at the second shifted
    position, so a row whose second position is padding loses its prior there (a transformers
    quirk; our formula always counts it)."""
    g = torch.Generator().manual_seed(seed)
    seq_logits = torch.randn(b * K, t, V, generator=g, dtype=torch.float64)
    doc_scores = torch.randn(b, K, generator=g, dtype=torch.float64)
    target = torch.randint(3, V, (b, t), generator=g)
    target[:, : len(leading)] = torch.tensor(leading)
    for row, length in enumerate([t, t - 2, len(leading) + 2][:b]):
        target[row, length:] = PAD
    return seq_logits, doc_scores, target


def _ours_from_hf_inputs(seq_logits, doc_scores, target, exclude_bos: bool):
    """Per-token log-probs and mask of the same quantity get_nll scores: logits at position t
    predict target[t + 1] (get_nll shifts the target left and pads the end)."""
    shifted = torch.cat([target[:, 1:], torch.full_like(target[:, :1], PAD)], dim=1)  # (b, t)
    b, t = target.shape
    logprobs = torch.log_softmax(seq_logits, -1).view(b, K, t, V)
    token_logprobs = logprobs.gather(-1, shifted.view(b, 1, t, 1).expand(b, K, t, 1)).squeeze(-1)  # (b, k, t)
    mask = shifted.ne(PAD)
    if exclude_bos and bool(shifted[:, 0].eq(BOS).all()):
        mask[:, 0] = False
    return doc_scores, token_logprobs, mask


@pytest.mark.parametrize(
    ("leading", "exclude_bos"),
    [([BOS], False), ([EOS, BOS], True), ([EOS, BOS], False)],
)
def test_rag_sequence_equals_transformers_get_nll(hf_models, leading, exclude_bos):
    rag_sequence, _ = hf_models
    seq_logits, doc_scores, target = _hf_case(5, leading)
    doc_scores.requires_grad_(True)
    expected = rag_sequence.get_nll(
        seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0, exclude_bos_score=exclude_bos
    )
    (expected_grad,) = torch.autograd.grad(expected.sum(), doc_scores)
    ours = rag_sequence_nll(*_ours_from_hf_inputs(seq_logits, doc_scores, target, exclude_bos))
    (ours_grad,) = torch.autograd.grad(ours.sum(), doc_scores)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grad, expected_grad)


def test_rag_token_equals_transformers_get_nll(hf_models):
    _, rag_token = hf_models
    seq_logits, doc_scores, target = _hf_case(6, [BOS])
    doc_scores.requires_grad_(True)
    expected = rag_token.get_nll(seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), doc_scores)
    ours = rag_token_nll(*_ours_from_hf_inputs(seq_logits, doc_scores, target, exclude_bos=False))
    (ours_grad,) = torch.autograd.grad(ours.sum(), doc_scores)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grad, expected_grad)


def test_losses_are_batch_means_with_detached_diagnostics():
    doc_scores, token_logprobs, mask = _random_case(7)
    doc_scores.requires_grad_(True)
    for loss_fn, nll_fn in ((rag_sequence_loss, rag_sequence_nll), (rag_token_loss, rag_token_nll)):
        loss, diagnostics = loss_fn(doc_scores, token_logprobs, mask)
        torch.testing.assert_close(loss, nll_fn(doc_scores, token_logprobs, mask).mean())
        assert loss.requires_grad
        assert all(not v.requires_grad and v.dim() == 0 for v in diagnostics.values())
        assert 0 < diagnostics["prior_entropy"] <= math.log(doc_scores.shape[1]) + 1e-9
    _, diagnostics = rag_sequence_loss(doc_scores, token_logprobs, mask)
    assert 0 <= diagnostics["posterior_entropy"] <= math.log(doc_scores.shape[1]) + 1e-9


def test_gradient_reaches_retriever_and_generator():
    doc_scores, token_logprobs, mask = _random_case(8)
    doc_scores.requires_grad_(True)
    token_logprobs.requires_grad_(True)
    for fn in (rag_sequence_nll, rag_token_nll):
        g_doc, g_tok = torch.autograd.grad(fn(doc_scores, token_logprobs, mask).sum(), (doc_scores, token_logprobs))
        assert g_doc.abs().sum() > 0 and torch.isfinite(g_doc).all()
        assert (g_tok.abs().sum(1) > 0).eq(mask).all()  # exactly the unmasked positions get gradient
        torch.testing.assert_close(g_doc.sum(-1), torch.zeros(doc_scores.shape[0], dtype=torch.float64))


@pytest.mark.parametrize(
    "shapes",
    [((2, 3), (2, 4, 5), (2, 5)), ((2, 3), (2, 3, 5), (2, 4)), ((2, 3, 1), (2, 3, 5), (2, 5))],
)
def test_bad_shapes_raise_value_error(shapes):
    doc, tok, mask = (torch.zeros(s) for s in shapes)
    for fn in (rag_sequence_nll, rag_token_nll):
        with pytest.raises(ValueError):
            fn(doc, tok, mask)


def test_enumeration_sanity_two_passages_two_tokens():
    # Hand-checkable: p(y|x) under RAG-Sequence for every pair of per-passage token probabilities.
    for p1, p2 in itertools.product([0.2, 0.9], repeat=2):
        token_logprobs = torch.log(torch.tensor([[[p1, p2], [p2, p1]]], dtype=torch.float64))
        doc_scores = torch.zeros(1, 2, dtype=torch.float64)
        mask = torch.ones(1, 2)
        expected = -math.log(0.5 * p1 * p2 + 0.5 * p2 * p1)
        assert rag_sequence_nll(doc_scores, token_logprobs, mask).item() == pytest.approx(expected)
        expected_token = -math.log((0.5 * p1 + 0.5 * p2) ** 2)
        assert rag_token_nll(doc_scores, token_logprobs, mask).item() == pytest.approx(expected_token)
