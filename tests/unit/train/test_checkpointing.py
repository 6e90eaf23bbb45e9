"""Evaluation metrics (EM/F1/recall), the metrics JSONL + plot, checkpoint folders, and the pure
helpers of the training step (candidate union, visited columns, batch schedule)."""

from __future__ import annotations

import pytest
import torch

from raggen.errors import DataError
from raggen.train.checkpointing import read_checkpoint, write_checkpoint

# ----------------------------------------------------------------------------------- checkpoints


class _Saved:
    """Anything with save_pretrained: writes one file so the folder can be checked."""

    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, path: str) -> None:
        import os

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "tag.txt"), "w") as fh:
            fh.write(self.tag)


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    cache = {"version": 1, "restart_chains": False, "states": {"q1": "p7", "q2": 3}}
    write_checkpoint(
        tmp_path / "c",
        models={"generator": _Saved("g"), "query_encoder": _Saved("q")},
        step=12,
        epoch=1,
        optimizer=opt,
        jsa_cache_state=cache,
        extra={"estimator": "jsa"},
    )
    state = read_checkpoint(tmp_path / "c")
    assert state.step == 12 and state.epoch == 1 and state.extra["estimator"] == "jsa"
    assert sorted(state.model_dirs) == ["generator", "query_encoder"]
    assert (tmp_path / "c" / "generator" / "tag.txt").read_text() == "g"
    assert state.jsa_cache_state == cache
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(state.optimizer_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="not a complete"):
        read_checkpoint(tmp_path / "c")
    write_checkpoint(tmp_path / "d", models={}, step=1)
    with pytest.raises(ValueError, match="already holds"):
        write_checkpoint(tmp_path / "d", models={}, step=2)
    with pytest.raises(ValueError, match="unknown names"):
        write_checkpoint(tmp_path / "e", models={"decoder": _Saved("x")}, step=1)
