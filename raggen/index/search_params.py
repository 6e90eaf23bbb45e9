"""FAISS's per-search knobs as one value: IVF ``nprobe``, HNSW ``efSearch`` and a re-ranked index's
``refine_k_factor``.

They come in layers: a call's own, then the opener's (``index.search`` settings), then the
version's tuned ``search_defaults`` (manifest), then the index's own (FAISS's nprobe 1 / efSearch
16). A field left None means "the next layer's", so the layers combine with ``over``. One frozen
value (cheap to pickle: it travels in every direct call to a shard actor) instead of three loose
arguments through each layer of the search path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SearchParams:
    nprobe: int | None = None  # IVF lists probed per query
    ef_search: int | None = None  # HNSW candidate list size
    refine_k_factor: float | None = None  # re-ranked indexes: k x this candidates re-scored

    @classmethod
    def of(cls, source: Any) -> SearchParams:
        """The three fields of anything that carries them (``SearchSettings``, a manifest's
        ``search_defaults``); None gives no setting at all."""
        if source is None:
            return cls()
        return cls(source.nprobe, source.ef_search, source.refine_k_factor)

    def over(self, base: SearchParams) -> SearchParams:
        """These, every unset field taken from ``base`` (the next layer down)."""
        return SearchParams(
            base.nprobe if self.nprobe is None else self.nprobe,
            base.ef_search if self.ef_search is None else self.ef_search,
            base.refine_k_factor if self.refine_k_factor is None else self.refine_k_factor,
        )

    def __reduce__(self):
        """Pickled as its three fields: a slotted dataclass's default state costs 7 us each way,
        this 1-2 (every direct call to a shard actor carries one)."""
        return SearchParams, (self.nprobe, self.ef_search, self.refine_k_factor)

    def as_kwargs(self) -> dict[str, Any]:
        """``{"nprobe": ..., "ef_search": ..., "refine_k_factor": ...}``, for keyword APIs (FAISS
        helpers in ``raggen.index.shard``, ``SearchSettings``)."""
        return {"nprobe": self.nprobe, "ef_search": self.ef_search, "refine_k_factor": self.refine_k_factor}


#: nothing set: every field left to the next layer (the default of the search path's ``params``)
NO_OVERRIDES = SearchParams()
