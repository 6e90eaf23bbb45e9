"""Generator: teacher-forced log-likelihoods, step-wise decoding and FiD reading, checked against HF directly.

Every tiny kind (BART, T5, GPT-2, Llama, Qwen2); chat prompts, the decoder-only prompt cache and
decoding per family are in test_models_generator_families.py.
"""

from __future__ import annotations

import pytest
import torch

from raggen.models.generator import Generator
from raggen.models.generator_inputs import source_text, target_mask
from raggen.models.tiny import BOS_ID, EOS_ID, GENERATOR_KINDS, PAD_ID, make_tiny_generator

QUESTIONS = ["who wrote hamlet?", "what is the capital of france"]
PASSAGES = [
    ["shakespeare wrote hamlet around 1600 in london", "the river thames flows"],
    ["paris is the capital and largest city of france by far", "bread"],
]
TARGETS = ["william shakespeare", "paris"]
KINDS = list(GENERATOR_KINDS)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("generators")
    return {kind: make_tiny_generator(str(root / kind), kind=kind, seed=1) for kind in KINDS}


@pytest.fixture(scope="module")
def generators(model_dirs) -> dict[str, Generator]:
    return {kind: Generator.from_pretrained(path).eval() for kind, path in model_dirs.items()}


def manual_row_logprobs(gen: Generator, question: str, passage: str, target: str) -> torch.Tensor:
    """log p(y_t | ...) for one row, straight from the HF model's logits (log_softmax + gather)."""
    tok, model, config = gen.tokenizer, gen.model, gen.model.config
    target_ids = tok(target, add_special_tokens=False)["input_ids"] + [config.eos_token_id]
    text = source_text(question, passage)
    with torch.no_grad():
        if config.is_encoder_decoder:
            src = tok(text, return_tensors="pt")
            dec = torch.tensor([[config.decoder_start_token_id] + target_ids[:-1]])
            out = model(input_ids=src["input_ids"], attention_mask=src["attention_mask"], decoder_input_ids=dec)
            logits = out.logits[0]
        else:
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + [config.bos_token_id] + target_ids[:-1]])
            logits = model(input_ids=ids).logits[0, len(prompt) :]
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[torch.arange(len(target_ids)), torch.tensor(target_ids)]


@pytest.mark.parametrize("kind", KINDS)
def test_token_logprobs_equal_manual_hf_computation_per_row(generators, kind):
    gen = generators[kind]
    with torch.no_grad():
        logprobs, mask = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
    assert logprobs.shape[:2] == (2, 2) and logprobs.shape[2] == mask.shape[1]
    for b in range(2):
        for k in range(2):
            expected = manual_row_logprobs(gen, QUESTIONS[b], PASSAGES[b][k], TARGETS[b])
            n = len(expected)
            torch.testing.assert_close(logprobs[b, k, :n], expected, atol=1e-5, rtol=1e-5)
            assert torch.all(logprobs[b, k, n:] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_target_mask_counts_eos_and_zeroes_padding(generators, kind):
    gen = generators[kind]
    ids, mask = gen.tokenize_targets(TARGETS)
    for row, text in enumerate(TARGETS):
        n = len(gen.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        assert mask[row].tolist() == [1.0] * n + [0.0] * (ids.shape[1] - n)
        assert ids[row, n - 1].item() == gen.eos_id == EOS_ID
        assert torch.all(ids[row, n:] == PAD_ID)
    # the mask recovered from ids alone (as decoding does) is the same
    torch.testing.assert_close(target_mask(ids, gen.eos_id, gen.pad_id), mask)


def test_target_mask_stops_at_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 7, 2, 2, 2], [5, 2, 9, 9, 2], [5, 6, 7, 8, 9]])
    assert target_mask(ids, eos_id=2, pad_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    ids = torch.tensor([[5, 2, 0, 0], [5, 0, 0, 0]])
    assert target_mask(ids, eos_id=2, pad_id=0).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_rows_equal_rows_computed_alone(generators, kind):
    gen = generators[kind]
    with torch.no_grad():
        batched, _ = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
        for b in range(2):
            for k in range(2):
                alone, mask = gen.token_logprobs([QUESTIONS[b]], [[PASSAGES[b][k]]], [TARGETS[b]])
                n = int(mask.sum())
                torch.testing.assert_close(batched[b, k, :n], alone[0, 0, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_next_logprobs_agree_with_teacher_forcing(generators, kind):
    gen = generators[kind]
    with torch.no_grad():
        logprobs, mask = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
        encoded = gen.encode(QUESTIONS, PASSAGES)
        ids, _ = gen.tokenize_targets(TARGETS)
        row_ids = ids.repeat_interleave(2, dim=0)  # (b*k, t)
        rows = torch.tensor([3, 0, 2, 1])  # any order, as a beam search reorders rows
        for t in range(ids.shape[1]):
            prefixes = torch.cat([torch.full((4, 1), gen.bos_id), row_ids[rows, :t]], dim=1)
            step = gen.next_logprobs(encoded, rows, prefixes)  # (4, v)
            assert step.shape == (4, gen.vocab_size)
            torch.testing.assert_close(step.exp().sum(-1), torch.ones(4), atol=1e-4, rtol=0)
            got = step.gather(1, row_ids[rows, t : t + 1]).squeeze(1)
            want = logprobs.reshape(4, -1)[rows, t]
            live = mask.repeat_interleave(2, dim=0)[rows, t].bool()
            torch.testing.assert_close(got[live], want[live], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bart", "gpt2", "llama"])
def test_step_fn_matches_next_logprobs_without_graph(generators, kind):
    gen = generators[kind]
    encoded = gen.encode(QUESTIONS, PASSAGES)
    rows, prefixes = torch.tensor([1, 2]), torch.full((2, 1), gen.bos_id)
    stepped = gen.step_fn(encoded)(rows, prefixes)  # cached passages' keys/values
    assert not stepped.requires_grad
    torch.testing.assert_close(stepped, gen.next_logprobs(encoded, rows, prefixes).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_cached_cross_attention_step_equals_the_uncached_step(generators, kind):
    gen = generators[kind]
    encoded = gen.encode(QUESTIONS, PASSAGES)
    rows, prefixes = torch.tensor([2, 2, 0]), torch.tensor([[BOS_ID, 2000, 2001], [BOS_ID, 3000, 2001], [BOS_ID, 5, 6]])
    uncached = gen.next_logprobs(encoded, rows, prefixes)  # grad enabled: plain forward
    assert uncached.requires_grad and encoded.cross_kv is None
    with torch.no_grad():
        cached = gen.next_logprobs(encoded, rows, prefixes)
        assert encoded.cross_kv is not None and len(encoded.cross_kv) == gen.model.config.num_hidden_layers
        assert encoded.cross_kv[0][0].shape[0] == 4  # one entry per encoded row, not per beam
        again = gen.next_logprobs(encoded, rows.flip(0), prefixes.flip(0))
    torch.testing.assert_close(cached, uncached.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, cached.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_logprob_sums_token_logprobs_and_ignores_tokens_after_eos(generators, kind):
    gen = generators[kind]
    with torch.no_grad():
        logprobs, _ = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
        encoded = gen.encode(QUESTIONS, PASSAGES)
        ids, _ = gen.tokenize_targets(TARGETS)
        row_ids = ids.repeat_interleave(2, dim=0)
        rows = torch.arange(4)
        seq = gen.sequence_logprob(encoded, rows, row_ids)
        torch.testing.assert_close(seq, logprobs.sum(-1).reshape(4), atol=1e-5, rtol=1e-5)
        garbage = torch.cat([row_ids, torch.full((4, 2), 1000)], dim=1)  # tokens after EOS
        torch.testing.assert_close(gen.sequence_logprob(encoded, rows, garbage), seq, atol=1e-5, rtol=1e-5)


def test_greedy_stepping_reproduces_hf_generate(generators):
    """bos_id / eos_id agree with what HF's own generate() does with this model and tokenizer."""
    gen = generators["bart"]
    encoded = gen.encode(QUESTIONS[:1], PASSAGES[:1])
    step = gen.step_fn(encoded)
    prefix = torch.tensor([[gen.bos_id]])
    for _ in range(5):
        nxt = step(torch.tensor([0]), prefix).argmax(-1, keepdim=True)
        prefix = torch.cat([prefix, nxt], dim=1)
    src = gen.tokenizer([source_text(QUESTIONS[0], PASSAGES[0][0])], return_tensors="pt")
    with torch.no_grad():
        hf = gen.model.generate(**src, max_new_tokens=5, do_sample=False, num_beams=1, forced_eos_token_id=None)
    n = min(hf.shape[1], prefix.shape[1])
    assert hf[0, :n].tolist() == prefix[0, :n].tolist()


@pytest.mark.parametrize("kind", ["bart", "t5"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fid_with_one_passage_unmasked_equals_reading_it_alone(model_dirs, kind, attn):
    gen = Generator.from_pretrained(model_dirs[kind], attn_implementation=attn).eval()
    assert gen.model.config._attn_implementation == attn
    with torch.no_grad():
        alone, mask = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)  # (b, k, t)
        both, _ = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, None)
        for j in range(2):
            log_mask = torch.full((2, 2), -1e4)
            log_mask[:, j] = 0.0
            fid, fid_mask = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, log_mask)
            torch.testing.assert_close(fid_mask, mask)
            torch.testing.assert_close(fid, alone[:, j], atol=1e-5, rtol=1e-5)
            assert (both - alone[:, j]).abs().max() > 1e-4  # reading both passages is different
        zero, _ = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, torch.zeros(2, 2))
        torch.testing.assert_close(zero, both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fid_gradient_reaches_passage_mask_and_matches_finite_differences(model_dirs, attn):
    gen = Generator.from_pretrained(model_dirs["bart"], dtype=torch.float64, attn_implementation=attn).eval()
    base = torch.tensor([[0.3, -1.2], [-0.5, 0.8]], dtype=torch.float64)
    log_mask = base.clone().requires_grad_(True)
    logprobs, _ = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, log_mask)
    logprobs.sum().backward()
    grad = log_mask.grad
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    # directional derivative along a random direction, by central differences
    direction = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = 1e-5
    with torch.no_grad():
        up = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, base + eps * direction)[0].sum()
        down = gen.fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, base - eps * direction)[0].sum()
    numeric, analytic = (up - down).item() / (2 * eps), (grad * direction).sum().item()
    assert abs(numeric - analytic) < 1e-7 + 1e-4 * abs(analytic)


def test_fid_refuses_decoder_only_models_and_bad_mask_shapes(generators):
    with pytest.raises(ValueError, match="encoder-decoder"):
        generators["gpt2"].fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, None)
    with pytest.raises(ValueError, match=r"passage_log_mask must be \(b, k\)"):
        generators["bart"].fid_token_logprobs(QUESTIONS, PASSAGES, TARGETS, torch.zeros(2, 3))


def test_token_logprobs_keep_the_graph(generators):
    gen = generators["bart"]
    logprobs, mask = gen(QUESTIONS, PASSAGES, TARGETS)
    (logprobs.sum(-1)).logsumexp(-1).sum().backward()
    grads = [p.grad for p in gen.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    gen.model.zero_grad(set_to_none=True)


def test_bad_batches_are_refused_with_the_row_named(generators):
    gen = generators["bart"]
    with pytest.raises(ValueError, match=r"passages\[1\]"):
        gen.token_logprobs(QUESTIONS, [["a", "b"], ["c"]], TARGETS)
    with pytest.raises(ValueError, match="targets"):
        gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS[:1])
    with pytest.raises(ValueError, match="empty"):
        gen.token_logprobs([], [], [])
    with pytest.raises(ValueError, match=r"passages\[0\]\[1\]"):
        gen.encode(QUESTIONS[:1], [["a", 3]])


@pytest.mark.parametrize("kind", KINDS)
def test_decode_inverts_target_tokenisation(generators, kind):
    gen = generators[kind]
    ids, _ = gen.tokenize_targets(["paris france", "the eiffel tower"])
    assert gen.decode_batch(ids) == ["paris france", "the eiffel tower"]
    with_start = torch.cat([torch.tensor([gen.bos_id]), ids[0]])
    assert gen.decode(with_start) == "paris france"
    assert gen.bos_id == BOS_ID


def test_forced_bos_of_bart_checkpoints_leads_every_target(generators):
    base = generators["bart"]
    base.model.generation_config.forced_bos_token_id = 1000
    try:
        gen = Generator(base.model, base.tokenizer, max_target_length=4)
        ids, mask = gen.tokenize_targets(["paris france is a long answer"])
    finally:
        base.model.generation_config.forced_bos_token_id = None
    assert ids[0, 0].item() == 1000 and ids[0, -1].item() == EOS_ID and ids.shape[1] == 4 and mask.sum() == 4


def test_save_pretrained_round_trip(generators, tmp_path):
    gen = generators["t5"]
    gen.save_pretrained(str(tmp_path / "saved"))
    again = Generator.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.no_grad():
        a, _ = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
        b, _ = again.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
    torch.testing.assert_close(a, b)
    assert (again.bos_id, again.eos_id, again.pad_id) == (gen.bos_id, gen.eos_id, gen.pad_id)


def test_missing_model_is_a_config_error(tmp_path):
    from raggen.errors import ConfigError

    with pytest.raises(ConfigError, match="generator"):
        Generator.from_pretrained(str(tmp_path / "nope" / "missing"))


@pytest.mark.parametrize(
    "kind, weight", [("bart", "model.encoder.layers.0.fc1.weight"), ("llama", "model.layers.1.self_attn.k_proj.weight")]
)
def test_checkpoint_missing_a_weight_is_refused_with_its_name(model_dirs, tmp_path, kind, weight):
    """A weight transformers would initialise at random is a ConfigError, not a silently random reader."""
    import shutil

    from safetensors.torch import load_file, save_file

    from raggen.errors import ConfigError

    path = tmp_path / kind
    shutil.copytree(model_dirs[kind], path)
    weights = load_file(str(path / "model.safetensors"))
    assert weight in weights
    del weights[weight]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="generator") as refused:
        Generator.from_pretrained(str(path))
    assert weight in str(refused.value) and "missing" in str(refused.value)


def test_causal_lm_without_a_pad_token_pads_with_eos(model_dirs):
    """GPT-2 checkpoints define no pad token: EOS pads, and only the first EOS of a target counts."""
    gen = Generator.from_pretrained(model_dirs["gpt2"]).eval()
    gen.model.config.pad_token_id = gen.model.generation_config.pad_token_id = None
    gen.tokenizer.pad_token = None
    no_pad = Generator(gen.model, gen.tokenizer).eval()
    assert no_pad.pad_id == no_pad.eos_id == EOS_ID and no_pad.tokenizer.pad_token_id == EOS_ID
    ids, mask = no_pad.tokenize_targets(TARGETS)
    torch.testing.assert_close(target_mask(ids, no_pad.eos_id, no_pad.pad_id), mask)
    with torch.no_grad():
        batched, _ = no_pad.token_logprobs(QUESTIONS, PASSAGES, TARGETS)
        for b in range(2):
            expected = manual_row_logprobs(no_pad, QUESTIONS[b], PASSAGES[b][1], TARGETS[b])
            torch.testing.assert_close(batched[b, 1, : len(expected)], expected, atol=1e-5, rtol=1e-5)
