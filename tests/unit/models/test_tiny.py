"""Tiny models: real checkpoints (safetensors + tokenizer) that every loader opens offline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from raggen.models import Generator, Reranker, TextEncoder
from raggen.models.tiny import (
    BOS_ID,
    EOS_ID,
    GENERATOR_KINDS,
    PAD_ID,
    TINY_CHAT_TEMPLATE,
    make_tiny_encoder,
    make_tiny_generator,
    make_tiny_reranker,
)


def test_special_ids_are_the_bert_tokenizers():
    from raggen.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == 30522


@pytest.mark.parametrize("kind", GENERATOR_KINDS)
def test_generator_checkpoint_layout_and_config(tmp_path, kind):
    path = make_tiny_generator(str(tmp_path / kind), kind=kind)
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"} <= files
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # no temp folders left
    gen = Generator.from_pretrained(path)
    assert gen.is_encoder_decoder == (kind in ("bart", "t5")) and not gen.uses_chat_template
    assert (gen.bos_id, gen.eos_id, gen.pad_id, gen.target_prefix) == (BOS_ID, EOS_ID, PAD_ID, [])
    assert gen.tokenizer.pad_token_id == PAD_ID and gen.tokenizer.sep_token_id == EOS_ID
    assert "token_type_ids" not in gen.tokenizer("a question")
    assert gen.decode(gen.tokenize_targets(["Paris, France"])[0][0]).lower() == "paris, france"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_and_qwen2_have_rotary_positions_and_grouped_query_attention(tmp_path, kind):
    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / kind), kind=kind))
    config = gen.model.config
    assert type(gen.model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.hidden_size % config.num_attention_heads == 0 and (config.hidden_size // 4) % 2 == 0
    assert config.rope_parameters["rope_type"] == "default"  # rotary: no learned position table
    assert not any("position" in name for name, _ in gen.model.named_parameters())
    assert config.tie_word_embeddings == (kind == "qwen2")
    # transformers 5 reads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer whatever it declares
    assert type(gen.tokenizer).__name__ == {"llama": "BertTokenizer", "qwen2": "Qwen2Tokenizer"}[kind]
    wider = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "w"), kind=kind, heads=8, kv_heads=4))
    assert (wider.model.config.num_attention_heads, wider.model.config.num_key_value_heads) == (8, 4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_a_chat_template_is_saved_with_the_tokenizer(tmp_path, kind):
    path = make_tiny_generator(str(tmp_path / kind), kind=kind, chat_template=TINY_CHAT_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == TINY_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "[CLS] user : hi [SEP] [CLS] assistant :"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == BOS_ID and ids.count(EOS_ID) == 1
    assert Generator.from_pretrained(path).uses_chat_template


def test_hf_generate_starts_at_cls_and_stops_at_sep(tmp_path):
    """Decoding with this tokenizer through HF's own generate() uses the same special tokens."""
    path = make_tiny_generator(str(tmp_path / "bart"), kind="bart")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(**tok(["question: a context: b"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out[0, 0].item() == BOS_ID
    assert out[0, -1].item() == EOS_ID  # forced at max length, or generated earlier


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(os.path.join(make_tiny_generator(str(tmp_path / "a"), seed=3), "model.safetensors"))
    b = load_file(os.path.join(make_tiny_generator(str(tmp_path / "b"), seed=3), "model.safetensors"))
    c = load_file(os.path.join(make_tiny_generator(str(tmp_path / "c"), seed=4), "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_making_twice_replaces_the_folder(tmp_path):
    path = str(tmp_path / "enc")
    make_tiny_encoder(path, d_model=32, heads=2)
    make_tiny_encoder(path, d_model=48, heads=2)
    assert TextEncoder.from_pretrained(path).dim == 48
    assert os.listdir(tmp_path) == ["enc"]


def test_reader_size_is_about_ten_million_parameters(tmp_path):
    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "reader"), kind="bart", size="reader"))
    params = sum(p.numel() for p in gen.model.parameters())
    assert 8e6 < params < 16e6, params
    assert gen.model.config.d_model == 256 and gen.model.config.encoder_layers == 3


def test_dims_override_and_validation(tmp_path):
    path = make_tiny_reranker(str(tmp_path / "r"), d_model=32, layers=1, heads=4)
    config = Reranker.from_pretrained(path).model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 4)
    with pytest.raises(ValueError, match="kind"):
        make_tiny_generator(str(tmp_path / "x"), kind="mamba")
    with pytest.raises(ValueError, match="kv_heads"):
        make_tiny_generator(str(tmp_path / "x"), kind="llama", kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        make_tiny_generator(str(tmp_path / "x"), kind="gpt2", kv_heads=1)
    with pytest.raises(ValueError, match="even head dim"):
        make_tiny_generator(str(tmp_path / "x"), kind="qwen2", d_model=36, heads=4)
    with pytest.raises(ValueError, match="chat template"):
        make_tiny_generator(str(tmp_path / "x"), kind="t5", chat_template=TINY_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="size"):
        make_tiny_generator(str(tmp_path / "x"), size="huge")
    with pytest.raises(ValueError, match="divisible"):
        make_tiny_encoder(str(tmp_path / "x"), d_model=30, heads=4)
    assert not (tmp_path / "x").exists()


def test_round_trip_through_save_pretrained(tmp_path):
    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "g"), kind="bart")).eval()
    rer = Reranker.from_pretrained(make_tiny_reranker(str(tmp_path / "r"))).eval()
    enc = TextEncoder.from_pretrained(make_tiny_encoder(str(tmp_path / "e"))).eval()
    gen.save_pretrained(str(tmp_path / "g2"))
    rer.save_pretrained(str(tmp_path / "r2"))
    enc.save_pretrained(str(tmp_path / "e2"))
    gen2 = Generator.from_pretrained(str(tmp_path / "g2")).eval()
    rer2 = Reranker.from_pretrained(str(tmp_path / "r2")).eval()
    enc2 = TextEncoder.from_pretrained(str(tmp_path / "e2")).eval()
    q, p, t = ["who?"], [["alice did it", "bob"]], ["alice"]
    with torch.no_grad():
        torch.testing.assert_close(gen.token_logprobs(q, p, t)[0], gen2.token_logprobs(q, p, t)[0])
        torch.testing.assert_close(rer(q, p), rer2(q, p))
        torch.testing.assert_close(enc(["alice did it"]), enc2(["alice did it"]))


def test_all_tiny_models_load_with_the_hub_offline(tmp_path):
    """A fresh interpreter with HF_HUB_OFFLINE=1 opens every kind of tiny checkpoint."""
    paths = {
        "bart": make_tiny_generator(str(tmp_path / "bart"), kind="bart"),
        "t5": make_tiny_generator(str(tmp_path / "t5"), kind="t5"),
        "gpt2": make_tiny_generator(str(tmp_path / "gpt2"), kind="gpt2"),
        "llama": make_tiny_generator(str(tmp_path / "llama"), kind="llama"),
        "qwen2": make_tiny_generator(str(tmp_path / "qwen2"), kind="qwen2"),
        "reranker": make_tiny_reranker(str(tmp_path / "reranker")),
        "encoder": make_tiny_encoder(str(tmp_path / "encoder")),
    }
    script = textwrap.dedent(
        f"""
        import torch
        from raggen.models import Generator, Reranker, TextEncoder
        paths = {paths!r}
        for kind in ("bart", "t5", "gpt2", "llama", "qwen2"):
            lp, mask = Generator.from_pretrained(paths[kind]).token_logprobs(["q"], [["p"]], ["a b"])
            n = 4 if kind == "qwen2" else 3  # bytes "a", " b" or word pieces "a", "b"; then EOS
            assert lp.shape == (1, 1, n) and torch.isfinite(lp).all(), kind
        assert Reranker.from_pretrained(paths["reranker"])(["q"], [["p", "r"]]).shape == (1, 2)
        assert TextEncoder.from_pretrained(paths["encoder"]).encode(["x"]).shape == (1, 64)
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
