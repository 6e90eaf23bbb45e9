"""What workers exchange besides DDP's gradients: averaged metrics, the JSA chain caches, a value
computed on rank 0; each is a no-op in a single process."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from raggen.objectives import JSAChainCache


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def average_metrics(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over workers (one all-reduce); keys must agree across workers."""
    if not _dist() or torch.distributed.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_cache_state(cache: JSAChainCache) -> dict[str, Any]:
    """Every worker's chain states merged (the shards hold disjoint example ids)."""
    state = cache.state_dict()
    if not _dist() or torch.distributed.get_world_size() == 1:
        return state
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, state["states"])
    merged: dict[Any, Any] = {}
    for part in parts:
        merged.update(part)
    return {**state, "states": merged}


def cache_digest(state: dict[str, Any] | None) -> str:
    """A fingerprint of a JSA cache state (tests compare a restored cache with the saved one)."""
    items = sorted((str(k), str(v)) for k, v in ((state or {}).get("states") or {}).items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def from_rank_zero(fn, rank: int, world_size: int):
    """``fn()`` on rank 0, its result (pickled) on every rank; an error there raises everywhere."""
    import torch.distributed as dist

    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if not distributed:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status != "ok":
        raise RuntimeError(f"opening the index failed on rank 0: {value}")
    return value
