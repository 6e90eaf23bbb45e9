"""The learning-rate schedule: hand-computed multipliers, per-group rates, and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from raggen.config import load_config
from raggen.errors import ConfigError
from raggen.train.optim import apply_lr_schedule, make_optimizer
from raggen.train.schedule import lr_multiplier
from raggen.train.settings import LoopSettings

# total 10 steps, 4 of warm-up: the decay runs over steps 4..9 with progress (step - 4) / 6
WARM = [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0)]  # first step, mid warm-up, end of warm-up, decay start


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("step, want", WARM)
def test_warmup_ramps_linearly_to_the_peak(kind, step, want):
    assert lr_multiplier(step, 10, 4, kind) == pytest.approx(want)


@pytest.mark.parametrize(
    "kind, step, want",
    [
        ("linear", 7, 0.5),  # middle of the decay
        ("cosine", 7, 0.5),
        ("linear", 9, 1 / 6),  # last step: still a positive rate
        ("cosine", 9, 0.5 * (1 + math.cos(math.pi * 5 / 6))),  # 0.0669873
        ("cosine", 5, 0.5 * (1 + math.cos(math.pi / 6))),  # 0.9330127
        ("constant", 9, 1.0),
    ],
)
def test_decay_after_warmup(kind, step, want):
    assert lr_multiplier(step, 10, 4, kind) == pytest.approx(want)


def test_defaults_keep_a_constant_rate():
    assert [lr_multiplier(s, 5) for s in range(5)] == [1.0] * 5
    assert lr_multiplier(0, 1, 0, "cosine") == 1.0  # a one-step run takes its step at the peak


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier(0, 10, 0, "step")
    with pytest.raises(ValueError, match="total >= 1"):
        lr_multiplier(0, 0)


def test_each_group_gets_its_configured_rate_times_the_multiplier_even_after_a_restore():
    models = {"query_encoder": torch.nn.Linear(2, 2), "generator": torch.nn.Linear(2, 2)}
    settings = LoopSettings(steps=10, lr=1e-3, retriever_lr=1e-4, warmup_steps=4, lr_schedule="cosine")
    opt = make_optimizer(models, ("query_encoder", "generator"), settings)
    assert apply_lr_schedule(opt, settings, 1) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 5e-4])
    # a resume restores the optimizer state with its old rates; the schedule overrides them
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 123.0
    opt.load_state_dict(saved)
    apply_lr_schedule(opt, settings, 9)
    last = 0.5 * (1 + math.cos(math.pi * 5 / 6))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4 * last, 1e-3 * last])


def test_loop_settings_and_config_name_the_field():
    with pytest.raises(ValidationError, match="lr_schedule"):
        LoopSettings(lr_schedule="exponential")
    with pytest.raises(ValidationError, match="warmup_steps"):
        LoopSettings(warmup_steps=-1)
    with pytest.raises(ValidationError, match="frozen"):
        LoopSettings().steps = 3  # what the workers get cannot drift from what was validated
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(overrides=["train.lr_schedule=exponential"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(overrides=["train.steps=10", "train.warmup_steps=11"])
    cfg = load_config(overrides=["train.warmup_steps=10", "train.lr_schedule=linear"])
    assert (cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.log_every) == (10, "linear", 10)
