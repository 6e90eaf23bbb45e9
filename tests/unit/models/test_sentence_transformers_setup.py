"""A sentence-transformers checkpoint's own pooling and normalisation, and the build's warning when
a config leaves raggen's defaults in their way."""

from __future__ import annotations

import json
import logging

from raggen.models.loading import bundled_minilm_path
from raggen.models.sentence_transformers_setup import local_reader, own_setup, setup_mismatch, warn_on_setup_mismatch
from raggen.models.specs import EncoderSpec


def _st_folder(tmp_path, pooling_mode: str, normalize: bool) -> str:
    """A tiny encoder saved with sentence-transformers' module files (as a BGE-style model ships)."""
    from raggen.models import make_tiny_encoder

    folder = make_tiny_encoder(str(tmp_path / "st"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    modes = {
        m: m == pooling_mode for m in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
    }
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return folder


def test_the_bundled_minilm_says_mean_pooling_normalised():
    assert own_setup(local_reader(str(bundled_minilm_path()))) == {
        "pooling": "mean", "normalize": True, "query_prefix": "", "passage_prefix": ""
    }  # fmt: skip


def test_a_bge_style_model_left_at_the_defaults_is_warned_about(tmp_path, caplog):
    folder = _st_folder(tmp_path, "pooling_mode_cls_token", normalize=True)
    with caplog.at_level(logging.WARNING, logger="raggen.models.sentence_transformers_setup"):
        found = warn_on_setup_mismatch("index.encoder", EncoderSpec(name_or_path=folder))
    assert found == ["pooling: mean (the model pools cls)", "normalize: false (the model normalises)"]
    assert "index.encoder" in caplog.text and "pooling and normalize" in caplog.text
    # settings the config states are its own choice, matching or not: nothing to say
    assert (
        warn_on_setup_mismatch("index.encoder", EncoderSpec(name_or_path=folder, pooling="cls", normalize=True)) == []
    )
    assert (
        warn_on_setup_mismatch("index.encoder", EncoderSpec(name_or_path=folder, pooling="mean", normalize=False)) == []
    )
    partly = EncoderSpec(name_or_path=folder, pooling="cls")
    assert setup_mismatch(partly, own_setup(local_reader(folder))) == ["normalize: false (the model normalises)"]


def test_modes_raggen_lacks_and_plain_hf_models(tmp_path):
    folder = _st_folder(tmp_path, "pooling_mode_max_tokens", normalize=False)
    assert own_setup(local_reader(folder)) == {
        "pooling": "other: pooling_mode_max_tokens", "normalize": False, "query_prefix": "", "passage_prefix": ""
    }  # fmt: skip
    assert setup_mismatch(EncoderSpec(name_or_path=folder), own_setup(local_reader(folder))) == [
        "pooling: mean (the model pools other: pooling_mode_max_tokens)"
    ]
    from raggen.models import make_tiny_encoder

    plain = make_tiny_encoder(str(tmp_path / "plain"))  # no modules.json: nothing known, nothing said
    assert own_setup(local_reader(plain)) is None and warn_on_setup_mismatch("x", EncoderSpec(name_or_path=plain)) == []
    # a hub id that cannot be fetched here (offline) is not checked, and never fails the caller
    assert warn_on_setup_mismatch("x", EncoderSpec(name_or_path="nobody/no-such-model-raggen")) == []


def test_an_e5_style_model_s_prompts_are_read_and_their_absence_warned_about(tmp_path, caplog):
    folder = _st_folder(tmp_path, "pooling_mode_mean_tokens", normalize=True)
    settings = {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}
    (tmp_path / "st" / "config_sentence_transformers.json").write_text(json.dumps(settings))
    setup = own_setup(local_reader(folder))
    assert setup == {"pooling": "mean", "normalize": True, "query_prefix": "query: ", "passage_prefix": "passage: "}
    with caplog.at_level(logging.WARNING, logger="raggen.models.sentence_transformers_setup"):
        found = warn_on_setup_mismatch("index.encoder", EncoderSpec(name_or_path=folder, normalize=True))
    assert found == [
        "query_prefix: none (the model's query prompt is 'query: ')",
        "passage_prefix: none (the model's passage prompt is 'passage: ')",
    ]
    assert "query_prefix and passage_prefix" in caplog.text
    stated = EncoderSpec(name_or_path=folder, normalize=True, query_prefix="", passage_prefix="")  # "none", said so
    assert setup_mismatch(stated, setup) == []
    # retrieval.* names (jina-style) and a model with only a query instruction (BGE-style)
    settings["prompts"] = {"retrieval.query": "Represent the query: ", "passage": ""}
    (tmp_path / "st" / "config_sentence_transformers.json").write_text(json.dumps(settings))
    assert own_setup(local_reader(folder))["query_prefix"] == "Represent the query: "
    assert own_setup(local_reader(folder))["passage_prefix"] == ""
