"""Reader pre-training: the schedule, the answer normalisation, and a short run that learns something."""

import json

import pytest

from raggen.train.reader import lr_at, normalize_answer, pretrain_reader


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 10, 100) < lr_at(20, 1.0, 10, 100)


def test_normalize_answer():
    assert normalize_answer("  Radusk  Mills.") == "radusk mills"
    assert normalize_answer("Fofobid") == normalize_answer("fofobid")


def test_short_pretraining_lowers_the_loss_and_saves_a_loadable_reader(tmp_path):
    out = str(tmp_path / "reader")
    result = pretrain_reader(
        out,
        steps=25,
        batch_size=8,
        lr=3e-3,
        warmup=2,
        eval_every=25,
        eval_examples=8,
        max_source_length=96,
        dims={"d_model": 32, "layers": 1, "heads": 2, "ffn": 64},
        span_weight=0.5,
    )
    rows = [json.loads(line) for line in open(out + ".metrics.jsonl")]
    assert len(rows) == 25 and "heldout_em" in rows[-1]
    assert rows[-1]["span_loss"] < rows[0]["span_loss"]  # the extractive head learns too
    assert abs(rows[-1]["passage_gap_nats"]) < 50  # a finite mean log-likelihood difference
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    from raggen.models.generator import Generator

    reloaded = Generator.from_pretrained(out)
    assert reloaded.model.config.d_model == 32
    assert result["steps"] == 25


def test_passage_reliance_is_zero_for_identical_passages_and_sees_a_copying_reader(tmp_path):
    """The probe is exact: with the same passage on both sides the gap is 0; with a passage that
    holds the answer against one that does not, a reader whose answer logits follow the passage
    (here: a tiny BART trained a few steps on a single example) shows a positive gap."""
    from raggen.models.generator import Generator
    from raggen.models.tiny import make_tiny_generator
    from raggen.train.reader import passage_reliance

    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "g"), d_model=32, layers=1, heads=2, ffn=64))
    same = [("q?", "the answer is zorvik", "zorvik")] * 2
    assert passage_reliance(gen, same) == pytest.approx(0.0, abs=1e-5)
    import torch

    pair = [("which word?", "the word is zorvik", "zorvik"), ("which word?", "the word is palnet", "palnet")]
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    for _ in range(60):
        tok, mask = gen.token_logprobs([q for q, _, _ in pair], [[p] for _, p, _ in pair], [a for _, _, a in pair])
        loss = -(tok[:, 0] * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert passage_reliance(gen, pair) > 1.0


def test_half_precision_save_halves_the_file_and_reloads_in_fp32_on_cpu(tmp_path):
    """The shipped reader is stored in float16; on CPU it must come back as float32 and score answers
    as the float32 model does (to float16 rounding), and saving must not change the live model."""
    import os

    import torch

    from raggen.models.generator import Generator
    from raggen.models.tiny import make_tiny_generator

    gen = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "g"), d_model=32, layers=1, heads=2, ffn=64))
    gen.save_pretrained(str(tmp_path / "full"))
    gen.save_pretrained(str(tmp_path / "half"), dtype=torch.float16)
    assert gen.model.dtype == torch.float32
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")  # noqa: E731
    assert size("half") < 0.6 * size("full")
    half = Generator.from_pretrained(str(tmp_path / "half"))
    assert half.model.dtype == torch.float32
    args = (["q?"], [["the answer is zorvik", "no answer here"]], ["zorvik"])
    with torch.no_grad():
        ref, mask = gen.token_logprobs(*args)
        got, _ = half.token_logprobs(*args)
    assert torch.allclose(ref * mask[:, None], got * mask[:, None], atol=2e-2)
    assert not torch.equal(ref, got)  # it really went through 16 bits


def test_answer_spans_find_the_last_whole_occurrence_or_mark_none():
    import torch

    from raggen.train.reader import answer_spans

    ids = torch.tensor([[101, 7, 8, 9, 102, 5, 7, 8, 102, 0], [101, 4, 4, 102, 0, 0, 0, 0, 0, 0]])
    spans = answer_spans(ids, [[7, 8], [4, 5]])
    assert spans.tolist() == [[6, 7], [-100, -100]]  # the passage's mention, not the question's


def test_span_loss_is_the_mean_start_end_cross_entropy_over_real_positions():
    import torch

    from raggen.train.reader import span_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 2)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    spans = torch.tensor([[1, 2], [4, 4], [-100, -100]])
    expected = []
    for i in range(2):  # brute force: log-softmax over the row's real positions only
        real = int(mask[i].sum())
        for j in range(2):
            expected.append(-torch.log_softmax(logits[i, :real, j], dim=0)[spans[i, j]])
    want = (torch.stack(expected[0::2]).mean() + torch.stack(expected[1::2]).mean()) / 2
    assert torch.allclose(span_loss(logits, mask, spans), want, atol=1e-6)
    assert float(span_loss(logits, mask, torch.full((3, 2), -100))) == 0.0
