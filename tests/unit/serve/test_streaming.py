"""Streaming an answer as it is decoded, without Ray: greedy RAG-Token commits one token per step,
so the prefixes the step function sees are the answer's own prefixes; the text pieces built from
them add up to exactly the non-streamed answer (tiny generators of two tokenizer families)."""

from __future__ import annotations

import pytest

from raggen.models import Generator, make_tiny_generator
from raggen.serve.pipeline import (
    TextDeltas,
    decode_answers,
    decode_tokens,
    generate_batch,
    generate_outputs,
    streams_while_decoding,
)


def _hits(texts: list[str], scores: list[float]) -> list[dict]:
    return [{"id": f"p{i}", "title": f"T{i}", "text": t, "score": s} for i, (t, s) in enumerate(zip(texts, scores))]


HITS = _hits(["the mill is in ost", "a ferry crosses the river", "bread and salt"], [2.0, 1.0, 0.5])


@pytest.fixture(scope="module", params=["bart", "qwen2"])
def generator(request, tmp_path_factory) -> Generator:
    path = make_tiny_generator(str(tmp_path_factory.mktemp(request.param) / "gen"), kind=request.param)
    return Generator.from_pretrained(path, max_target_length=10).eval()


def test_greedy_rag_token_prefixes_are_the_answers_prefixes(generator):
    seen: list[list[int]] = []
    (tokens,) = decode_tokens(generator, ["where is the mill?"], [HITS], "rag-token", 8, 1, on_prefix=seen.append)
    assert seen and all(p[0] == generator.bos_id for p in seen)
    answer = [generator.bos_id, *tokens]
    assert all(answer[: len(p)] == p for p in seen)  # each step's prefix is committed, never revised
    assert [len(p) for p in seen] == list(range(1, len(seen) + 1))  # one new token per step
    (plain,) = decode_answers(generator, ["where is the mill?"], [HITS], "rag-token", 8, 1)
    assert generator.decode(tokens) == plain

    deltas = TextDeltas(generator.decode)
    pieces = [d for p in seen if (d := deltas.update(p))]
    pieces += deltas.pieces(tokens)
    pieces.append(deltas.finish(plain))
    assert "".join(pieces) == plain


@pytest.mark.parametrize("decoding, beams", [("rag-token", 2), ("rag-sequence-fast", 1), ("rag-sequence-thorough", 2)])
def test_other_decodings_stream_the_finished_answer(generator, decoding, beams):
    assert not streams_while_decoding(decoding, beams)
    with pytest.raises(ValueError, match="on_prefix"):
        decode_tokens(generator, ["q"], [HITS], decoding, 6, beams, on_prefix=lambda p: None)
    (tokens,) = decode_tokens(generator, ["where is the mill?"], [HITS], decoding, 6, beams)
    text = generator.decode(tokens)
    deltas = TextDeltas(generator.decode)
    assert "".join(deltas.pieces(tokens)) + deltas.finish(text) == text


def test_generate_outputs_per_row_beams_and_finish_reason(generator):
    questions = ["q one", "q two", "q three"]
    hits = [HITS, HITS, []]
    outs = generate_outputs(generator, questions, hits, ["rag-token"] * 3, [4, 4, 4], [1, 2, 1])
    assert outs[2] == {"text": "", "completion_tokens": 0, "finish_reason": "stop"}
    for out, beams, q in zip(outs[:2], (1, 2), questions):
        (tokens,) = decode_tokens(generator, [q], [HITS], "rag-token", 4, beams)
        assert out["text"] == generator.decode(tokens)
        ended = generator.eos_id in tokens
        assert out["finish_reason"] == ("stop" if ended else "length")
        assert out["completion_tokens"] == (tokens.index(generator.eos_id) if ended else 4)
    assert generate_batch(generator, questions, hits, ["rag-token"] * 3, [4, 4, 4], 1)[0] == outs[0]["text"]


def test_text_deltas_hold_back_a_split_character():
    texts = {1: "ab", 2: "ab\ufffd", 3: "abé", 4: "abé c"}
    deltas = TextDeltas(lambda tokens: texts[len(tokens)])
    assert [deltas.update([0] * n) for n in range(1, 5)] == ["ab", "", "é", " c"]
    assert deltas.finish("abé c") == "" and deltas.finish("something else") == ""
