"""The optimizer and its learning rates: one AdamW param group per trained model, each at its
configured rate times the schedule's multiplier of the global step (so a resume continues it)."""

from __future__ import annotations

import torch
from torch import nn

from raggen.train.schedule import lr_multiplier
from raggen.train.settings import LoopSettings

RETRIEVER_ROLES = ("query_encoder", "posterior_encoder", "passage_encoder")


def role_lr(role: str, settings: LoopSettings) -> float:
    """The configured (peak) rate of a model: retrievers use ``retriever_lr`` when set."""
    return settings.retriever_lr if role in RETRIEVER_ROLES and settings.retriever_lr else settings.lr


def make_optimizer(
    models: dict[str, nn.Module], roles: tuple[str, ...], settings: LoopSettings
) -> torch.optim.Optimizer:
    """AdamW with one param group per trained model, in ``roles`` order (stable across restarts,
    so a saved optimizer state lines up), each at ``role_lr``."""
    groups = []
    for role in roles:
        params = [p for p in models[role].parameters() if p.requires_grad]
        groups.append({"params": params, "lr": role_lr(role, settings), "name": role})
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def apply_lr_schedule(optimizer: torch.optim.Optimizer, settings: LoopSettings, step: int) -> float:
    """Set every group's rate for ``step`` (0-based global step) from the settings, never from the
    restored optimizer state (a resume may change ``train.lr``); returns the multiplier."""
    scale = lr_multiplier(step, settings.steps, settings.warmup_steps, settings.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = role_lr(group["name"], settings) * scale
    return scale
