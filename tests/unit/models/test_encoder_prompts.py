"""A model's prompts (E5's ``query: `` / ``passage: ``, BGE's query instruction): the passage prompt
starts every passage's encoder input in both passage formats, the query prompt every question; a
query encoder without one of its own takes the searched index's (training, Serve, the CLI)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, DPRContextEncoder

from raggen.models.build import use_index_prompts
from raggen.models.posterior import PosteriorRetriever
from raggen.models.retriever import EncoderSpec, TextEncoder
from raggen.models.stand_ins import make_tiny_dpr_encoder
from raggen.models.tiny import make_tiny_encoder
from raggen.serve.live_index import load_live_index
from raggen.serve.pipeline import retrieve_batch
from tests.helpers import publish_encoded_index

TITLES = ["Ada Lovelace", ""]
TEXTS = ["Ada Lovelace wrote the first published algorithm.", "A passage with no title is its text alone."]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return make_tiny_encoder(str(tmp_path_factory.mktemp("bert") / "enc"), seed=1)


def test_the_passage_prompt_starts_a_dpr_pair_and_an_untitled_text(tmp_path):
    path = make_tiny_dpr_encoder(str(tmp_path / "ctx"), side="ctx", seed=3)
    spec = EncoderSpec(name_or_path=path, pooling="cls", passage_prefix="passage: ")
    got = spec.load().eval().encode_passages(TITLES, TEXTS)
    tokenizer, model = AutoTokenizer.from_pretrained(path), DPRContextEncoder.from_pretrained(path).eval()
    with torch.no_grad():
        titled = model(**tokenizer("passage: " + TITLES[0], TEXTS[0], return_tensors="pt")).pooler_output
        untitled = model(**tokenizer("passage: " + TEXTS[1], return_tensors="pt")).pooler_output
    torch.testing.assert_close(got, torch.cat([titled, untitled]), atol=1e-5, rtol=0)


def test_the_passage_prompt_starts_a_joined_passage(bert_dir):
    enc = EncoderSpec(name_or_path=bert_dir, passage_prefix="passage: ").load().eval()
    want = enc.encode(["passage: Ada Lovelace . " + TEXTS[0], "passage: " + TEXTS[1]], prefix="")
    torch.testing.assert_close(enc.encode_passages(TITLES, TEXTS), want)
    plain = EncoderSpec(name_or_path=bert_dir).load().eval()
    assert not torch.allclose(plain.encode_passages(TITLES, TEXTS), want, atol=1e-4)


def test_the_query_prompt_starts_every_question_with_and_without_grad(bert_dir):
    own = EncoderSpec(name_or_path=bert_dir, query_prefix="query: ").load().eval()
    plain = EncoderSpec(name_or_path=bert_dir).load().eval()
    assert plain.query_prefix is None and own.query_prefix == "query: "
    want = plain.encode(["query: who wrote it?"])
    torch.testing.assert_close(own.encode(["who wrote it?"]), want)
    torch.testing.assert_close(own(["who wrote it?"]).detach(), want)  # the training step's forward
    torch.testing.assert_close(plain.encode(["who wrote it?"], prefix="query: "), want)
    # whose prefix a search uses: the encoder's own when it has one ("" included), else the index's
    assert own.query_prefix_for("search: ") == "query: " and plain.query_prefix_for("search: ") == "search: "
    said_none = EncoderSpec(name_or_path=bert_dir, query_prefix="").load()
    assert said_none.query_prefix_for("search: ") == ""


def test_training_s_query_side_encoders_take_the_index_prompt_unless_they_have_their_own(bert_dir):
    query = EncoderSpec(name_or_path=bert_dir).load()
    models = {"query_encoder": query, "posterior_encoder": PosteriorRetriever.from_query_encoder(query)}
    use_index_prompts(models, "query: ")
    assert query.query_prefix == "query: " and models["posterior_encoder"].encoder.query_prefix == "query: "
    own = {"query_encoder": EncoderSpec(name_or_path=bert_dir, query_prefix="ask: ").load()}
    use_index_prompts(own, "query: ")
    assert own["query_encoder"].query_prefix == "ask: "


def test_serve_retrieval_puts_the_live_version_s_prompt_before_each_question(bert_dir, tmp_path):
    indexer = EncoderSpec(name_or_path=bert_dir, query_prefix="query: ", passage_prefix="passage: ").load().eval()
    passages = pd.DataFrame(
        {"id": [f"p{i}" for i in range(12)], "title": [f"T{i}" for i in range(12)],
         "text": [f"passage number {i} is about topic {i % 5}" for i in range(12)]}
    )  # fmt: skip
    xb = publish_encoded_index(passages, str(tmp_path / "ix"), indexer, bert_dir, tmp_path, num_shards=1)
    live = load_live_index(str(tmp_path / "ix"), None)
    assert live.query_prefix == "query: "
    served = TextEncoder.from_pretrained(bert_dir).eval()  # the Serve app's query encoder: no prefix of its own
    questions = ["which passage is about topic 3?", "topic 1"]
    got = retrieve_batch(served, live, questions, [4, 4])
    live.close()
    xq = served.encode(questions, prefix="query: ").numpy()
    want = np.argsort(-(xq @ xb.T), axis=1)[:, :4]
    assert [[h["id"] for h in row] for row in got] == [[f"p{j}" for j in row] for row in want]
    unprompted = np.argsort(-(served.encode(questions, prefix="").numpy() @ xb.T), axis=1)[:, :4]
    assert not np.array_equal(unprompted, want)  # the prompt changes what is found
