"""Every generator family through the one Generator interface, checked against HF computed by hand.

Families: BART, T5 (seq2seq), GPT-2 (absolute positions), Llama and Qwen2 (rotary positions,
grouped-query attention), the last two also with a chat template. Covers teacher-forced log-probs,
the cached decoder-only prompt against full recomputation, greedy decoding against HF
``generate``, and the three RAG decoders (batched, b=2, k=2) against hand-computed marginals and
brute-force enumeration over a restricted vocabulary.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from raggen.decoding import (
    rag_sequence_fast_generate,
    rag_sequence_thorough_generate,
    rag_token_generate,
)
from raggen.models.generator import Generator
from raggen.models.generator_inputs import source_text
from raggen.models.tiny import BOS_ID, EOS_ID, GENERATOR_KINDS, TINY_CHAT_TEMPLATE, make_tiny_generator

QUESTIONS = ["who wrote hamlet?", "what is the capital of france"]
PASSAGES = [
    ["shakespeare wrote hamlet around 1600 in london", "the river thames flows"],
    ["paris is the capital and largest city of france by far", "bread"],
]  # prompts of different lengths, so left padding differs per row
TARGETS = ["william shakespeare", "paris"]
FAMILIES = {kind: (kind, None) for kind in GENERATOR_KINDS}
FAMILIES.update({"llama-chat": ("llama", TINY_CHAT_TEMPLATE), "qwen2-chat": ("qwen2", TINY_CHAT_TEMPLATE)})
DECODER_ONLY = [name for name, (kind, _) in FAMILIES.items() if kind not in ("bart", "t5")]
GQA = ["llama", "qwen2", "llama-chat", "qwen2-chat"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generators(tmp_path_factory) -> dict[str, Generator]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (kind, template) in FAMILIES.items():
        path = make_tiny_generator(str(root / name), kind=kind, seed=2, chat_template=template)
        out[name] = Generator.from_pretrained(path).eval()
    return out


# ---- HF by hand -------------------------------------------------------------------------------


def hf_prompt(gen: Generator, question: str, passage: str) -> list[int]:
    """The documented decoder-only prompt: the default template, or the user turn of the chat template."""
    text = source_text(question, passage)
    if gen.tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        text = gen.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def hf_logprobs(gen: Generator, question: str, passage: str, target: list[int]) -> torch.Tensor:
    """(len(target), v) log p(. | x, z, y_<t) at each target position, from one plain HF forward."""
    model, config = gen.model, gen.model.config
    if config.is_encoder_decoder:
        src = gen.tokenizer(source_text(question, passage), return_tensors="pt")
        dec = torch.tensor([[config.decoder_start_token_id] + target[:-1]])
        logits = model(**src, decoder_input_ids=dec).logits[0]
    elif gen.tokenizer.chat_template:  # the answer follows the assistant header, no BOS between
        prompt = hf_prompt(gen, question, passage)
        logits = model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
    else:
        prompt = hf_prompt(gen, question, passage)
        logits = model(input_ids=torch.tensor([prompt + [config.bos_token_id] + target[:-1]])).logits[0, len(prompt) :]
    return torch.log_softmax(logits.float(), dim=-1)


def hf_token_logprobs(gen: Generator, question: str, passage: str, target: list[int]) -> torch.Tensor:
    """(len(target),) log p(y_t | x, z, y_<t)."""
    return hf_logprobs(gen, question, passage, target).gather(1, torch.tensor(target)[:, None]).squeeze(1)


def target_ids(gen: Generator, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"] + [gen.eos_id]


# ---- teacher forcing and prompts --------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_token_logprobs_equal_hf_by_hand(generators, name):
    gen = generators[name]
    with torch.no_grad():
        logprobs, mask = gen.token_logprobs(QUESTIONS, PASSAGES, TARGETS)  # (b, k, t)
    for b in range(2):
        for k in range(2):
            expected = hf_token_logprobs(gen, QUESTIONS[b], PASSAGES[b][k], target_ids(gen, TARGETS[b]))
            n = len(expected)
            assert mask[b].sum() == n
            torch.testing.assert_close(logprobs[b, k, :n], expected, atol=1e-5, rtol=1e-5)
            assert torch.all(logprobs[b, k, n:] == 0)


@pytest.mark.parametrize("name", ["llama-chat", "qwen2-chat"])
def test_chat_prompt_ends_with_the_assistant_header_and_no_bos_precedes_the_answer(generators, name):
    gen = generators[name]
    assert gen.uses_chat_template and gen.eos_id == EOS_ID  # the template closes a turn with [SEP]
    encoded = gen.encode(QUESTIONS, PASSAGES)
    header = gen.tokenizer("[CLS] assistant :", add_special_tokens=False)["input_ids"]
    for row in range(4):
        prompt = hf_prompt(gen, QUESTIONS[row // 2], PASSAGES[row // 2][row % 2])
        assert prompt[-len(header) :] == header
        real = encoded.prompt_ids[row][encoded.attention_mask[row].bool()].tolist()
        assert real + encoded.prompt_start[row].tolist() == prompt  # the last prompt token stands for [start]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_chat_answers_end_with_the_token_that_closes_an_assistant_turn(tmp_path, kind):
    template = TINY_CHAT_TEMPLATE.replace("[SEP]", "[MASK]")  # turns close with [MASK] (103)
    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "g"), kind=kind, chat_template=template))
    assert gen.eos_id == 103 and gen.bos_id == BOS_ID
    ids, mask = gen.tokenize_targets(["paris"])
    assert ids[0, int(mask.sum()) - 1].item() == 103
    with torch.no_grad():
        logprobs, _ = gen.token_logprobs(QUESTIONS[1:], PASSAGES[1:], ["paris"])
    expected = hf_token_logprobs(gen, QUESTIONS[1], PASSAGES[1][0], target_ids(gen, "paris"))
    torch.testing.assert_close(logprobs[0, 0, : len(expected)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen2-chat"])
def test_long_prompts_lose_the_end_of_the_passage_not_the_chat_header(generators, name):
    gen = generators[name]
    budget = len(gen._chat_tail) + 8  # 8 tokens of the user text kept: every prompt here is cut
    short = Generator(gen.model, gen.tokenizer, max_source_length=budget).eval()
    batch = short.tokenize_sources(QUESTIONS, PASSAGES)
    assert batch["input_ids"].shape[1] == budget
    tail = short._chat_tail  # "[CLS] assistant :" and what precedes it after the user text
    for row in range(4):
        full = hf_prompt(gen, QUESTIONS[row // 2], PASSAGES[row // 2][row % 2])
        got = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert got == (full if len(full) <= budget else full[: budget - len(tail)] + tail)
        if gen.uses_chat_template:
            assert tail and got[-len(tail) :] == full[-len(tail) :]
    if gen.uses_chat_template:
        with pytest.raises(ValueError, match="max_source_length"):
            Generator(gen.model, gen.tokenizer, max_source_length=len(tail))


# ---- the decoder-only prompt cache ------------------------------------------------------------


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_cached_prompt_steps_equal_full_recomputation(generators, name):
    gen = generators[name]
    encoded = gen.encode(QUESTIONS, PASSAGES)
    widths = []
    hook = gen.model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    ids, _ = gen.tokenize_targets(TARGETS)
    row_ids = ids.repeat_interleave(2, dim=0)  # (b*k, t)
    rows = torch.tensor([3, 0, 0, 2, 3])  # reordered and duplicated, as beams are
    try:
        for t in (0, 1, 3):
            prefixes = torch.cat([torch.full((5, 1), gen.bos_id), row_ids[rows, :t]], dim=1)  # (5, 1 + t)
            full = gen.next_logprobs(encoded, rows, prefixes)  # grad on: prompt + prefix in one forward
            assert full.requires_grad and (t > 0 or encoded.prompt_kv is None)
            widths.clear()
            with torch.no_grad():
                cached = gen.next_logprobs(encoded, rows, prefixes)
            assert widths[-1] == t + 1  # only the prefix went through the model
            torch.testing.assert_close(cached, full.detach(), atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
    config = gen.model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    keys, values = encoded.prompt_kv[0]
    assert len(encoded.prompt_kv) == config.num_hidden_layers
    assert keys.shape[:3] == values.shape[:3] == (4, kv_heads, encoded.prompt_ids.shape[1])  # per row, not per beam
    if name in GQA:
        assert kv_heads == 2 < config.num_attention_heads


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_cached_sequence_logprob_equals_teacher_forcing_and_the_cache_is_not_grown(generators, name):
    gen = generators[name]
    encoded = gen.encode(QUESTIONS, PASSAGES)
    ids, _ = gen.tokenize_targets(TARGETS)
    rows = torch.tensor([1, 1, 2, 0])
    targets = ids.repeat_interleave(2, dim=0)[rows]  # (4, t)
    full = gen.sequence_logprob(encoded, rows, targets).detach()  # grad on: full forward
    with torch.no_grad():
        cached = gen.sequence_logprob(encoded, rows, targets)
        kept = [(k.clone(), v.clone()) for k, v in encoded.prompt_kv]
        again = gen.sequence_logprob(encoded, rows.flip(0), targets.flip(0))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, cached.flip(0), atol=1e-5, rtol=1e-5)
    for (k0, v0), (k1, v1) in zip(kept, encoded.prompt_kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


# ---- decoding ---------------------------------------------------------------------------------


def _kw(gen: Generator, max_new_tokens: int, num_beams: int = 1) -> dict:
    return dict(
        bos_id=gen.bos_id, eos_id=gen.eos_id, pad_id=gen.pad_id, max_new_tokens=max_new_tokens, num_beams=num_beams
    )


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_greedy_rag_decoding_with_one_passage_equals_hf_generate(generators, name):
    """Batched, left-padded prompts of different lengths; k=1 so RAG-Token is plain greedy decoding."""
    gen = generators[name]
    passages = [[PASSAGES[0][0]], [PASSAGES[1][1]]]
    out = rag_token_generate(gen.step_fn(gen.encode(QUESTIONS, passages)), torch.zeros(2, 1), **_kw(gen, 5))
    prompts = [hf_prompt(gen, q, p[0]) for q, p in zip(QUESTIONS, passages)]
    if not gen.uses_chat_template:
        prompts = [p + [gen.bos_id] for p in prompts]  # the default template reads [start] before the answer
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[gen.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = gen.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            num_beams=1,
            eos_token_id=gen.eos_id,
            pad_token_id=gen.pad_id,
        )
    for b in range(2):
        assert out.best_tokens[b] == _until_eos(hf[b, width:].tolist(), gen.eos_id)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-chat"])
def test_thorough_scores_equal_marginals_computed_by_hand(generators, name):
    gen = generators[name]
    doc_logprobs = torch.log_softmax(torch.tensor([[0.3, -0.4], [1.2, 0.1]]), dim=-1)
    encoded = gen.encode(QUESTIONS, PASSAGES)

    def score(rows, targets, mask):
        return gen.sequence_logprob(encoded, rows, targets.masked_fill(~mask, gen.pad_id))

    out = rag_sequence_thorough_generate(
        gen.step_fn(encoded), doc_logprobs, sequence_logprob=score, **_kw(gen, 3, num_beams=2)
    )
    for b in range(2):
        assert len(out.tokens[b]) >= 2
        for y, got in zip(out.tokens[b], out.scores[b]):
            joint = [
                doc_logprobs[b, k] + hf_token_logprobs(gen, QUESTIONS[b], PASSAGES[b][k], y).sum() for k in range(2)
            ]
            assert got == pytest.approx(torch.stack(joint).logsumexp(0).item(), abs=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_decoder_runs_batched_and_scores_true_probabilities(generators, name):
    """RAG-Token beams, RAG-Sequence fast and thorough (b=2, k=2) as evaluate.generate_answers calls them."""
    gen = generators[name]
    doc_logprobs = torch.log_softmax(torch.tensor([[0.5, -0.5], [-1.0, 0.2]]), dim=-1)
    encoded = gen.encode(QUESTIONS, PASSAGES)
    step, kw = gen.step_fn(encoded), _kw(gen, 3, num_beams=2)

    def score(rows, targets, mask):
        return gen.sequence_logprob(encoded, rows, targets.masked_fill(~mask, gen.pad_id))

    token = rag_token_generate(step, doc_logprobs, **kw)
    fast = rag_sequence_fast_generate(step, doc_logprobs, **kw)
    thorough = rag_sequence_thorough_generate(step, doc_logprobs, sequence_logprob=score, **kw)
    stepwise = rag_sequence_thorough_generate(step, doc_logprobs, **kw)  # teacher forcing through the step fn
    assert thorough.tokens == stepwise.tokens
    for b in range(2):
        assert thorough.scores[b] == pytest.approx(stepwise.scores[b], abs=1e-4)
        assert len(token.tokens[b]) == 2 and token.scores[b] == sorted(token.scores[b], reverse=True)
        for y, got in zip(token.tokens[b], token.scores[b]):  # RAG-Token: sum_t log sum_k p(z_k) p(y_t | z_k)
            per_passage = torch.stack([hf_token_logprobs(gen, QUESTIONS[b], PASSAGES[b][k], y) for k in range(2)])
            assert got == pytest.approx((doc_logprobs[b, :, None] + per_passage).logsumexp(0).sum().item(), abs=1e-4)
        exact = dict(zip(map(tuple, thorough.tokens[b]), thorough.scores[b]))
        assert set(exact) == set(map(tuple, fast.tokens[b]))
        for y, got in zip(fast.tokens[b], fast.scores[b]):
            assert got <= exact[tuple(y)] + 1e-5  # fast decoding counts only the passages whose beam made y
        assert all(0 < len(y) <= 3 and all(0 <= i < gen.vocab_size for i in y) for y in thorough.tokens[b])
        assert all(s <= 0 for s in token.scores[b] + fast.scores[b] + thorough.scores[b])


class Restricted:
    """The generator's step function renormalised over a few real token ids (small ids 0..n-1).

    Small id 0 doubles as the start placeholder (a prefix's first column becomes ``bos_id``).
    """

    def __init__(self, gen: Generator, encoded, real_ids: list[int]):
        self.gen, self.step, self.real = gen, gen.step_fn(encoded), torch.tensor(real_ids)

    def __call__(self, rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        real = self.real[prefixes]  # (n, t)
        real[:, 0] = self.gen.bos_id
        return torch.log_softmax(self.step(rows, real)[:, self.real], dim=-1)  # (n, small v)

    def by_hand(self, question: str, passage: str, small: tuple[int, ...]) -> list[float]:
        """log p'(y_t | x, z, y_<t) of a small-id answer from a plain HF forward, renormalised over the same ids."""
        full = hf_logprobs(self.gen, question, passage, self.real[list(small)].tolist())  # (t, v)
        restricted = torch.log_softmax(full[:, self.real], dim=-1)  # (t, small v)
        return restricted.gather(1, torch.tensor(small)[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2-chat"])
def test_decoders_match_brute_force_over_a_restricted_vocabulary(generators, name):
    """Wide beams are exact: every answer of at most 2 tokens over 4 ids, scored by hand per passage."""
    gen = generators[name]
    real_ids = [1064, 2003, 3000, gen.eos_id]
    eos, body, steps = 3, (0, 1, 2), 2
    model = Restricted(gen, gen.encode(QUESTIONS, PASSAGES), real_ids)
    doc_logprobs = torch.log_softmax(torch.tensor([[0.8, -0.3], [-0.2, 0.4]]), dim=-1)
    answers = [(eos,)] + [(a, eos) for a in body] + list(itertools.product(body, repeat=steps))
    kw = dict(bos_id=0, eos_id=eos, pad_id=0, max_new_tokens=steps, num_beams=len(real_ids) ** steps)
    token = rag_token_generate(model, doc_logprobs, **kw)
    fast = rag_sequence_fast_generate(model, doc_logprobs, **kw)
    thorough = rag_sequence_thorough_generate(model, doc_logprobs, **kw)
    for b in range(2):
        lp = doc_logprobs[b].tolist()
        hand = {y: [model.by_hand(QUESTIONS[b], PASSAGES[b][k], y) for k in range(2)] for y in answers}  # [k][t]
        per_token = {  # RAG-Token: sum_t log sum_k p(z_k) p'(y_t | x, z_k, y_<t)
            y: sum(math.log(sum(math.exp(lp[k] + hand[y][k][t]) for k in range(2))) for t in range(len(y)))
            for y in answers
        }
        per_sequence = {y: math.log(sum(math.exp(lp[k] + sum(hand[y][k])) for k in range(2))) for y in answers}
        assert sum(math.exp(s) for s in per_sequence.values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(math.exp(s) for s in per_token.values()) == pytest.approx(1.0, abs=1e-5)
        assert token.scores[b] == sorted(token.scores[b], reverse=True)
        got = dict(zip(map(tuple, token.tokens[b]), token.scores[b]))
        assert set(got) == set(answers)
        for y, score in got.items():
            assert score == pytest.approx(per_token[y], abs=1e-4)
        for out in (fast, thorough):  # every answer is in every passage's beam: both are exact
            assert {tuple(y) for y in out.tokens[b]} == set(answers)
            for y, got in zip(out.tokens[b], out.scores[b]):
                assert got == pytest.approx(per_sequence[tuple(y)], abs=1e-4)
