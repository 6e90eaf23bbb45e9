"""Rank 0's progress line: its exact text, when it is due, and that a Ray worker can print it."""

from __future__ import annotations

import logging

import pytest

from raggen.train.progress import ProgressLog, ensure_log_handler, format_duration, format_progress


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (35.4, "35s"), (250, "4m10s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_progress_matches_the_documented_line():
    line = format_progress(40, 200, {"loss": 3.2109, "acceptance_rate": 0.4213}, 12.34, 2.9e-5, 250)
    assert line == "step 40/200 loss 3.21 acceptance 0.421 ex/s 12.3 lr 2.9e-05 eta 4m10s"
    assert format_progress(1, 2, {"loss": 0.5}, 1.0, 1e-3, 1) == "step 1/2 loss 0.5 ex/s 1.0 lr 1.0e-03 eta 1s"


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_log_averages_the_window_and_logs_every_n_steps_and_the_last(caplog):
    clock = _Clock()
    progress = ProgressLog(total=5, every=2, examples_per_step=4, clock=clock)
    lines = {}
    with caplog.at_level(logging.INFO, logger="raggen.train.progress"):
        for step, loss in zip(range(1, 6), [4.0, 2.0, 3.0, 1.0, 5.0]):
            clock.t = float(step)  # one second per step
            lines[step] = progress.update(step, {"loss": loss, "acceptance_rate": 0.5, "lr": 1e-4})
    assert lines[1] is None and lines[3] is None
    # steps 1-2: mean loss 3, 8 examples in 2 s, 3 steps left at 1 s each
    assert lines[2] == "step 2/5 loss 3 acceptance 0.5 ex/s 4.0 lr 1.0e-04 eta 3s"
    assert lines[4] == "step 4/5 loss 2 acceptance 0.5 ex/s 4.0 lr 1.0e-04 eta 1s"
    assert lines[5] == "step 5/5 loss 5 acceptance 0.5 ex/s 4.0 lr 1.0e-04 eta 0s"
    assert [r.getMessage() for r in caplog.records] == [lines[2], lines[4], lines[5]]


def test_progress_log_after_a_resume_counts_from_the_restored_step():
    clock = _Clock()
    progress = ProgressLog(total=100, every=10, examples_per_step=2, start_step=50, clock=clock)
    clock.t = 20.0  # 10 steps in 20 s -> 2 s a step, 40 steps left
    for step in range(51, 61):
        line = progress.update(step, {"loss": 1.0})
    assert line == "step 60/100 loss 1 ex/s 1.0 lr 0.0e+00 eta 1m20s"
    assert ProgressLog(total=10, every=0, examples_per_step=1).update(10, {"loss": 1.0}) is None  # 0: off


def test_ensure_log_handler_makes_info_visible_once(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a bare process, as a Ray worker is
    name = "raggen_test_progress_handler"
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "handlers", [])
    ensure_log_handler(name)
    ensure_log_handler(name)
    assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], logging.StreamHandler)
    assert logger.isEnabledFor(logging.INFO)
