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
    result = pretrain_reader(out, steps=25, batch_size=8, lr=3e-3, warmup=2, eval_every=25, eval_examples=8,
                             max_source_length=96, dims={"d_model": 32, "layers": 1, "heads": 2, "ffn": 64})
    rows = [json.loads(line) for line in open(out + ".metrics.jsonl")]
    assert len(rows) == 25 and "heldout_em" in rows[-1]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    from raggen.models.generator import Generator

    reloaded = Generator.from_pretrained(out)
    assert reloaded.model.config.d_model == 32
    assert result["steps"] == 25
