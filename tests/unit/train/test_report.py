"""``raggen report``: the EMA smoothing, run names, eval panels, and a PNG comparing two runs."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest

from raggen.cli import main
from raggen.train.report import ema, eval_groups, load_run, plot_runs, run_names


def test_ema_is_the_debiased_weighted_mean_of_the_values_so_far():
    # by hand, smooth 0.5: 1 -> 1; (0.5*2 + 0.25*1) / 0.75 = 5/3; (0.5*3 + 0.25*2 + 0.125*1) / 0.875 = 17/7
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0 at the start
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]
    assert ema([], 0.9) == []
    with pytest.raises(ValueError, match="smooth"):
        ema([1.0], 1.0)


def test_run_names_are_short_and_distinct():
    assert run_names(["runs/jsa", "s3://bucket/runs/vrag/", "x/rag/metrics.jsonl"]) == ["jsa", "vrag", "rag"]
    assert run_names(["a/run", "b/run"]) == ["a/run", "b/run"]


def _write_run(folder, loss0: float, decay: float, seed: int, steps: int = 120, eval_every: int = 20):
    """A synthetic metrics.jsonl: a noisy decaying loss, acceptance rate, warm-up + cosine lr, evals,
    a restart that replays steps 41-50 and a torn last line."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lr = 3e-4 * (step / 10 if step <= 10 else 0.5 * (1 + math.cos(math.pi * (step - 10) / (steps - 10))))
        lines.append(
            {
                "step": step,
                "loss": loss0 * math.exp(-decay * step) + 0.3 + rng.gauss(0, 0.25),
                "acceptance_rate": 0.3 + 0.3 * step / steps + rng.gauss(0, 0.05),
                "grad_norm": rng.uniform(0.5, 2),
                "examples_per_s": 12 + rng.gauss(0, 1),
                "lr": lr,
            }
        )
        if step % eval_every == 0:
            em = min(1.0, 0.1 + 0.6 * (1 - math.exp(-decay * step)))
            lines.append(
                {
                    "event": "eval",
                    "step": step,
                    "eval_em": em,
                    "eval_f1": min(1.0, em + 0.1),
                    "eval_recall@5": min(1.0, em + 0.25),
                    "eval_num_examples": 50,
                }
            )
        if step == 50:
            lines.append({"event": "restored", "step": 40})
            lines += [{"step": s, "loss": 99.0} for s in range(41, 51)]  # overwritten by the replay below
            lines += [
                dict(lines[i])
                for i in range(len(lines))
                if 41 <= lines[i].get("step", 0) <= 50 and "event" not in lines[i] and lines[i]["loss"] != 99.0
            ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 999, "lo'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_of_two_runs_writes_one_comparing_png(tmp_path):
    a = _write_run(tmp_path / "runs" / "jsa", 3.0, 0.03, seed=1)
    b = _write_run(tmp_path / "runs" / "vrag", 3.5, 0.015, seed=2)
    run = load_run(a, "jsa")
    assert [s["step"] for s in run.steps] == list(range(1, 121)) and max(s["loss"] for s in run.steps) < 99
    assert [e["step"] for e in run.evals] == [20, 40, 60, 80, 100, 120]
    assert eval_groups([run]) == [("eval answers", ["eval_em", "eval_f1"]), ("eval retrieval", ["eval_recall@5"])]

    out = plot_runs([a, b], tmp_path / "report.png", smooth=0.9)
    width, height = _png_size(tmp_path / "report.png")
    assert out == str(tmp_path / "report.png")
    # 5 training panels + 2 eval panels: 2 columns x 4 rows of 2.4 in, plus a band for the legend
    assert (width, height) == (1300, 1040)
    assert 40_000 < (tmp_path / "report.png").stat().st_size < 2_000_000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_report_command(tmp_path, capsys):
    a = _write_run(tmp_path / "a", 3.0, 0.03, seed=1, steps=30)
    b = _write_run(tmp_path / "b", 3.0, 0.01, seed=2, steps=30)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.png"), "--smooth", "0.6"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cmp.png")
    assert _png_size(tmp_path / "cmp.png")[0] == 1300
    assert main(["report", str(a)]) == 0  # one run: next to its metrics
    assert (a / "metrics.png").exists()
    assert main(["report", str(a), "--smooth", "1.5"]) == 2
    assert "--smooth" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
