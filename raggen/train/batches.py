"""Training batches: QA rows -> this rank's share in a fixed order -> seeded per-epoch permutations,
so batch ``step`` is the same in a restored run as in the one it replaces."""

from __future__ import annotations

import json
import random
from typing import Any

from raggen.errors import ConfigError
from raggen.train.step import Batch


def rank_share(rows: list[dict[str, Any]], rank: int, world_size: int) -> list[dict[str, Any]]:
    """Worker ``rank``'s share of the QA rows: every ``world_size``-th row by id, starting at ``rank``,
    all shares the same size (the last ``len(rows) % world_size`` rows by id go unused, as in a
    ``DistributedSampler`` that drops the remainder). A function of (rows, rank, world size) only,
    so a replacement worker group gets exactly the shares of the one it replaces."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    ordered = sorted(rows, key=lambda r: str(r["id"]))
    usable = len(ordered) - len(ordered) % world_size
    return ordered[rank:usable:world_size]


def example_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QA rows (``trainer.qa_items``: answers JSON-encoded) as examples sorted by id: the order the
    batch schedule permutes does not depend on the order the rows came in."""
    out = []
    for r in rows:
        answers = json.loads(r["answers"]) if isinstance(r["answers"], str) else list(r["answers"])
        out.append({"id": str(r["id"]), "question": str(r["question"]), "answers": answers})
    if not out:
        raise ConfigError("train.train_file: this worker's share is empty (fewer examples than workers?)")
    return sorted(out, key=lambda r: r["id"])


class BatchSchedule:
    """Batch ``step`` is a pure function of (examples, seed, step): epochs are seeded permutations,
    so a restored run sees exactly the batches the lost one would have seen."""

    def __init__(self, examples: list[dict[str, Any]], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._perms[epoch] = order
        return self._perms[epoch]

    def epoch_of(self, step: int) -> int:
        return step * self.batch_size // len(self.examples)

    def batch(self, step: int) -> Batch:
        n = len(self.examples)
        rows = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            rows.append(self.examples[self._perm(pos // n)[pos % n]])
        return Batch.from_rows(rows)
