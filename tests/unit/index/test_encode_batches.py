"""The encode pipeline's stage 2 without Ray: the tokenise stage's columns, length buckets, and the
bucketed encoder actor giving exactly ``TextEncoder.encode_passages``'s vectors in input order."""

from __future__ import annotations

import numpy as np
import pytest

from raggen.index.encoder_actor import PassageEncoderActor, embed_bucketed, length_buckets, trim_padding
from raggen.index.passage_tokens import NUM_TOKENS, load_passage_tokenizer, tokenize_batch
from raggen.index.work_dir import resolved_passage_format
from raggen.models.loading import MINILM_ID
from raggen.models.retriever import TextEncoder, tokenize_passages

MAX_LENGTH = 96
WORDS = "the river town keeps an old lantern maker whose sister plays the oboe every night".split()


def _passages(n: int = 13, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of very different lengths (2 to ~150 words, some truncated) and some empty titles."""
    rng = np.random.default_rng(seed)
    lengths = [2, 150, 5, 40, 1, 90, 12, 3, 70, 25, 8, 120, 60][:n]
    texts = [" ".join(rng.choice(WORDS, size=k)) for k in lengths]
    titles = ["" if i % 3 == 0 else f"Title {i} " + "word " * (i % 4) for i in range(n)]
    return {
        "id": np.array([f"p{i}" for i in range(n)]),
        "title": np.array(titles),
        "text": np.array(texts),
        "shard": np.arange(n, dtype=np.int64) % 2,
    }


@pytest.fixture(scope="module")
def dpr_dir(tmp_path_factory):
    from raggen.models.stand_ins import make_tiny_dpr_encoder

    return make_tiny_dpr_encoder(str(tmp_path_factory.mktemp("dpr") / "ctx"))


def _model(name: str, dpr_dir: str) -> tuple[str, str]:
    return (MINILM_ID, "mean") if name == "minilm" else (dpr_dir, "cls")


# ------------------------------------------------------------------------------------------ pure parts


def test_length_buckets_cover_every_row_once_within_the_budget():
    rng = np.random.default_rng(0)
    num_tokens = rng.integers(2, 200, size=101)
    buckets = length_buckets(num_tokens, max_rows=16, max_tokens=1000)
    rows = np.concatenate(buckets)
    assert sorted(rows.tolist()) == list(range(101))
    assert np.all(np.diff(num_tokens[rows]) >= 0), "buckets run shortest first, sorted within"
    for b in buckets:
        assert len(b) <= 16 and (len(b) == 1 or len(b) * num_tokens[b].max() <= 1000)
    assert length_buckets(np.array([500, 3]), max_rows=8, max_tokens=100)[-1].tolist() == [0]  # too long: alone
    assert length_buckets(np.zeros(0, np.int32), max_rows=8, max_tokens=100) == []


def test_trim_padding_keeps_the_used_columns_on_either_side():
    right = {
        "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0]]),
        "input_ids": np.array([[5, 6, 0, 0], [7, 0, 0, 0]]),
    }
    left = {k: v[:, ::-1].copy() for k, v in right.items()}
    assert trim_padding(right)["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert trim_padding(left)["input_ids"].tolist() == [[6, 5], [0, 7]]


@pytest.mark.parametrize("name", ["minilm", "dpr"])
def test_tokenize_stage_emits_fixed_width_int_columns(name, dpr_dir):
    path, _ = _model(name, dpr_dir)
    tokenizer = load_passage_tokenizer(path)
    fmt = resolved_passage_format(path, None)
    assert fmt == ("pair" if name == "dpr" else "joined")
    batch = _passages()
    out = tokenize_batch(batch, tokenizer=tokenizer, passage_format=fmt, max_length=MAX_LENGTH)
    assert set(out) == {"id", "title", "text", "shard", "input_ids", "attention_mask", "token_type_ids", NUM_TOKENS}
    n = len(batch["text"])
    for col in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[col].shape == (n, MAX_LENGTH) and out[col].dtype == np.int32
    assert out[NUM_TOKENS].dtype == np.int32 and out[NUM_TOKENS].tolist() == out["attention_mask"].sum(1).tolist()
    assert out[NUM_TOKENS].max() == MAX_LENGTH and out[NUM_TOKENS].min() < 10  # truncated and short rows
    ref = tokenize_passages(
        tokenizer, batch["title"].tolist(), batch["text"].tolist(), passage_format=fmt, max_length=MAX_LENGTH
    )  # padded to the batch's longest
    width = ref["input_ids"].shape[1]
    for col in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(out[col][:, :width], ref[col].numpy())
        assert not out[col][:, width:].any()
    titled = np.array([bool(t) for t in batch["title"]])
    has_second_segment = out["token_type_ids"].any(axis=1)
    assert has_second_segment.tolist() == (titled if name == "dpr" else np.zeros(n, bool)).tolist()
    empty = tokenize_batch(
        {k: v[:0] for k, v in batch.items()}, tokenizer=tokenizer, passage_format=fmt, max_length=MAX_LENGTH
    )
    assert empty["input_ids"].shape == (0, MAX_LENGTH) and empty[NUM_TOKENS].shape == (0,)


# ------------------------------------------------------------------------------------------ the actor


@pytest.mark.parametrize("name", ["minilm", "dpr"])
def test_bucketed_actor_matches_encode_passages_in_input_order(name, dpr_dir):
    path, pooling = _model(name, dpr_dir)
    batch = _passages()
    reference = TextEncoder.from_pretrained(path, pooling=pooling, max_length=MAX_LENGTH).eval()
    want = reference.encode_passages(batch["title"].tolist(), batch["text"].tolist()).numpy()  # (n, dim)

    # a small token budget forces several buckets, so sorting and un-sorting really happen
    actor = PassageEncoderActor(path, pooling=pooling, max_length=MAX_LENGTH, sub_batch_tokens=2 * MAX_LENGTH)
    tokens = tokenize_batch(
        batch,
        tokenizer=load_passage_tokenizer(path),
        max_length=MAX_LENGTH,
        passage_format=resolved_passage_format(path, None),
    )
    assert len(length_buckets(tokens[NUM_TOKENS], max_rows=len(want), max_tokens=2 * MAX_LENGTH)) >= 4
    out = actor(tokens)
    assert set(out) == {"id", "title", "text", "shard", "embedding"}, "token columns are dropped"
    assert out["id"].tolist() == batch["id"].tolist()
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == want.shape
    np.testing.assert_allclose(out["embedding"], want, atol=1e-5, rtol=0)

    alone = actor(dict(batch))  # no token columns: the actor tokenises itself
    np.testing.assert_allclose(alone["embedding"], want, atol=1e-5, rtol=0)


def test_embed_bucketed_one_row_per_bucket_equals_one_big_batch():
    """Extreme buckets (one row each, no padding at all) give the same vectors as one padded batch."""
    encoder = TextEncoder.from_pretrained(MINILM_ID, max_length=MAX_LENGTH).eval()
    tokens = tokenize_batch(_passages(), tokenizer=encoder.tokenizer, passage_format="joined", max_length=MAX_LENGTH)
    cols = {k: tokens[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    single = embed_bucketed(encoder, cols, tokens[NUM_TOKENS], max_rows=1, max_tokens=10**6)
    whole = embed_bucketed(encoder, cols, tokens[NUM_TOKENS], max_rows=10**6, max_tokens=10**9)
    np.testing.assert_allclose(single, whole, atol=1e-5, rtol=0)
    assert embed_bucketed(
        encoder, {k: v[:0] for k, v in cols.items()}, tokens[NUM_TOKENS][:0], max_rows=4, max_tokens=100
    ).shape == (0, encoder.dim)
