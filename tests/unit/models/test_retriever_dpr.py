"""DPR encoders load as their own classes and give DPR's vectors; a load that would invent weights is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

from raggen.errors import ConfigError
from raggen.models.retriever import EncoderSpec, TextEncoder
from raggen.models.stand_ins import make_tiny_dpr_encoder
from raggen.models.tiny import make_tiny_encoder

TITLES = ["Ada Lovelace", "", "Paris"]
TEXTS = [
    "Ada Lovelace wrote the first published algorithm for a machine.",
    "A passage with no title is encoded from its text alone.",
    "Paris is the capital of France and its largest city.",
]


@pytest.fixture(scope="module", params=[0, 24], ids=["cls", "projection"])
def dpr_dirs(tmp_path_factory, request) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpr")
    return {
        side: make_tiny_dpr_encoder(str(root / side), side=side, projection_dim=request.param, seed=3)
        for side in ("ctx", "question")
    }


def test_context_encoder_loads_as_its_class_and_gives_the_pooler_output_of_the_title_text_pair(dpr_dirs):
    enc = TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="cls", max_length=64).eval()
    assert type(enc.model).__name__ == "DPRContextEncoder"
    assert enc.passage_format == "pair"
    got = enc.encode_passages(TITLES, TEXTS)

    hf = DPRContextEncoder.from_pretrained(dpr_dirs["ctx"]).eval()
    tok = AutoTokenizer.from_pretrained(dpr_dirs["ctx"])
    with torch.no_grad():
        for i, (title, text) in enumerate(zip(TITLES, TEXTS)):
            inputs = tok(title, text, return_tensors="pt") if title else tok(text, return_tensors="pt")
            want = hf(**inputs).pooler_output[0]
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert got.shape == (3, enc.dim) and enc.dim == (hf.config.projection_dim or hf.config.hidden_size)


def test_question_encoder_gives_the_pooler_output_of_the_question(dpr_dirs):
    enc = TextEncoder.from_pretrained(dpr_dirs["question"], pooling="cls", max_length=64).eval()
    assert type(enc.model).__name__ == "DPRQuestionEncoder"
    questions = ["who wrote the first algorithm?", "what is the capital of france?"]
    got = enc.encode(questions)
    hf = DPRQuestionEncoder.from_pretrained(dpr_dirs["question"]).eval()
    tok = AutoTokenizer.from_pretrained(dpr_dirs["question"])
    with torch.no_grad():
        want = hf(**tok(questions, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pooling_pooler_equals_cls_for_dpr_and_mean_is_refused(dpr_dirs):
    cls_vecs = TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="cls").eval().encode_passages(TITLES, TEXTS)
    pooler = TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="pooler").eval().encode_passages(TITLES, TEXTS)
    torch.testing.assert_close(cls_vecs, pooler)
    with pytest.raises(ValueError, match="pooler_output"):
        TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="mean")


def test_joined_format_can_be_asked_for_and_changes_the_vectors(dpr_dirs):
    pair = TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="cls").eval()
    joined = EncoderSpec(name_or_path=dpr_dirs["ctx"], pooling="cls", passage_format="joined").load().eval()
    assert joined.passage_format == "joined"
    a, b = pair.encode_passages(TITLES, TEXTS), joined.encode_passages(TITLES, TEXTS)
    torch.testing.assert_close(a[1], b[1])  # no title: the same text either way
    assert not torch.allclose(a[0], b[0], atol=1e-4)
    torch.testing.assert_close(b, joined.encode([f"{t} . {x}" if t else x for t, x in zip(TITLES, TEXTS)]))


def test_bert_style_encoders_keep_the_joined_format_by_default(tmp_path):
    enc = TextEncoder.from_pretrained(make_tiny_encoder(str(tmp_path / "bert"), seed=1)).eval()
    assert enc.passage_format == "joined"
    torch.testing.assert_close(enc.encode_passages(["T"], ["some text"]), enc.encode(["T . some text"]))


def test_pooler_pooling_on_bert_uses_its_pooler(tmp_path):
    enc = TextEncoder.from_pretrained(make_tiny_encoder(str(tmp_path / "bert"), seed=1), pooling="pooler").eval()
    with torch.no_grad():
        want = enc.model(**enc.tokenize(["hello world"])).pooler_output
    torch.testing.assert_close(enc.encode(["hello world"]), want)


def _drop_weight(model_dir: str, contains: str) -> str:
    path = Path(model_dir) / "model.safetensors"
    weights = load_file(str(path))
    name = sorted(k for k in weights if contains in k)[0]
    del weights[name]
    save_file(weights, str(path), metadata={"format": "pt"})
    return name


def test_a_checkpoint_with_a_missing_weight_is_refused_with_its_name(tmp_path):
    path = make_tiny_dpr_encoder(str(tmp_path / "ctx"), side="ctx")
    name = _drop_weight(path, "layer.1.output.dense.weight")
    with pytest.raises(ConfigError, match="missing") as err:
        TextEncoder.from_pretrained(path, pooling="cls")
    assert name.split(".", 1)[1] in str(err.value)  # named (transformers may drop the wrapper prefix)


def test_a_context_checkpoint_is_never_read_as_a_question_encoder(tmp_path):
    """AutoModel maps model type dpr to DPRQuestionEncoder: with the declared class there is no MISSING."""
    path = make_tiny_dpr_encoder(str(tmp_path / "ctx"), side="ctx")
    assert json.loads((Path(path) / "config.json").read_text())["architectures"] == ["DPRContextEncoder"]
    enc = TextEncoder.from_pretrained(path, pooling="cls")
    assert isinstance(enc.model, DPRContextEncoder)


def test_trained_passage_encoder_forward_keeps_the_graph_in_pair_format(dpr_dirs):
    enc = TextEncoder.from_pretrained(dpr_dirs["ctx"], pooling="cls")
    vecs = enc(TEXTS, titles=TITLES)
    vecs.sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        torch.testing.assert_close(vecs.detach(), enc.eval().encode_passages(TITLES, TEXTS), atol=1e-5, rtol=1e-5)
