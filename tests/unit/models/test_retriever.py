"""Retrievers: MiniLM TextEncoder, normalisation, BiEncoder scoring, the posterior encoder, atomic saves."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from raggen.models.loading import MINILM_ID
from raggen.models.posterior import PosteriorRetriever
from raggen.models.retriever import BiEncoder, TextEncoder, inner_product_scores, save_pretrained_atomic
from raggen.models.tiny import make_tiny_encoder


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_pretrained(MINILM_ID, pooling="mean", max_length=64).eval()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_tiny_encoder(str(tmp_path_factory.mktemp("enc") / "e"), seed=5)


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences(minilm):
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by four percent.",
        "Who wrote the play Hamlet?",
        "Which author is Hamlet by?",
    ]
    vecs = F.normalize(minilm.encode(texts), dim=-1)
    assert vecs.shape == (5, 384) and minilm.dim == 384
    cos = vecs @ vecs.T
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[3, 4] > cos[3, 2] + 0.3
    assert cos[3, 4] > cos[3, 0]


def test_normalize_gives_unit_vectors_in_the_same_direction(tiny_path):
    raw = TextEncoder.from_pretrained(tiny_path).eval()
    unit = TextEncoder.from_pretrained(tiny_path, normalize=True).eval()
    texts = ["alpha beta", "gamma delta epsilon"]
    a, b = raw.encode(texts), unit.encode(texts)
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(b, F.normalize(a, dim=-1))
    assert not torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_bad_pooling_is_refused(tiny_path):
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder.from_pretrained(tiny_path, pooling="max")


def test_inner_product_scores_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    scores = inner_product_scores(q, d)
    expected = torch.tensor([[float(sum(q[b, i] * d[b, k, i] for i in range(5))) for k in range(4)] for b in range(3)])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected queries"):
        inner_product_scores(q, d[0])
    with pytest.raises(ValueError, match="dims differ"):
        inner_product_scores(q, d[..., :4])


def test_bi_encoder_scores_each_question_against_its_own_passages(tiny_path):
    bi = BiEncoder.from_pretrained(tiny_path).eval()
    assert bi.query_encoder is bi.passage_encoder
    questions, passages = ["q one", "q two"], [["p a", "p b", "p c"], ["p d", "p e", "p f"]]
    scores = bi(questions, passages)
    assert scores.shape == (2, 3) and scores.requires_grad
    with torch.no_grad():
        for b in range(2):
            for k in range(3):
                expected = bi.encode_queries([questions[b]])[0] @ bi.encode_passages([passages[b][k]])[0]
                torch.testing.assert_close(scores[b, k], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"passages\[1\]"):
        bi(questions, [["a", "b"], ["c"]])


def test_bi_encoder_with_two_encoders_keeps_them_apart(tiny_path, tmp_path):
    other = make_tiny_encoder(str(tmp_path / "other"), seed=6)
    bi = BiEncoder.from_pretrained(tiny_path, other)
    assert bi.query_encoder is not bi.passage_encoder
    with torch.no_grad():
        assert not torch.allclose(bi.encode_queries(["same text"]), bi.encode_passages(["same text"]))
    with pytest.raises(ValueError, match="dim"):
        BiEncoder(bi.query_encoder, TextEncoder.from_pretrained(make_tiny_encoder(str(tmp_path / "w"), d_model=32)))


def test_posterior_starts_as_a_separate_copy_of_the_query_encoder(tiny_path):
    prior = TextEncoder.from_pretrained(tiny_path).eval()
    posterior = PosteriorRetriever.from_query_encoder(prior).eval()
    prior_params = {p.data_ptr() for p in prior.parameters()}
    assert not prior_params & {p.data_ptr() for p in posterior.parameters()}
    q = ["who wrote hamlet?"]
    with torch.no_grad():
        vec_a, vec_b = posterior(q, ["shakespeare"]), posterior(q, ["marlowe"])
        assert not torch.allclose(vec_a, vec_b, atol=1e-4)
        assert not torch.allclose(vec_a, prior(q), atol=1e-4)
        # the same text through the prior gives the same vector: only the input differs
        torch.testing.assert_close(vec_a, prior(posterior.texts(q, ["shakespeare"])))
        before = prior(q).clone()
        next(posterior.parameters()).add_(1.0)
        torch.testing.assert_close(prior(q), before)
    assert posterior.texts(q, ["x"]) == ["who wrote hamlet? [SEP] x"]
    assert posterior.dim == prior.dim


def test_posterior_has_grad_and_round_trips(tiny_path, tmp_path):
    posterior = PosteriorRetriever.from_pretrained(tiny_path, max_length=32)
    out = posterior(["q1", "q2"], ["a1", "a2"])
    assert out.shape == (2, 64) and out.requires_grad
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in posterior.parameters())
    posterior.save_pretrained(str(tmp_path / "post"))
    again = PosteriorRetriever.from_pretrained(str(tmp_path / "post"), max_length=32)
    torch.testing.assert_close(again.encode(["q1"], ["a1"]), posterior.encode(["q1"], ["a1"]))
    with pytest.raises(ValueError, match="answers"):
        posterior(["q1"], [])


class _Broken:
    def save_pretrained(self, path: str) -> None:
        with open(os.path.join(path, "partial.bin"), "w") as f:
            f.write("half")
        raise OSError("disk full")


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def save_pretrained(self, path: str) -> None:
        with open(os.path.join(path, self.name), "w") as f:
            f.write(self.name)


def test_atomic_save_replaces_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    target = str(tmp_path / "model")
    save_pretrained_atomic(target, _Marker("v1"))
    save_pretrained_atomic(target, _Marker("v2"))
    assert os.listdir(target) == ["v2"]
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(target, _Marker("v3"), _Broken())
    assert os.listdir(target) == ["v2"]
    assert os.listdir(tmp_path) == ["model"]
