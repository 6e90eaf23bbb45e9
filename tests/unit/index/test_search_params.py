"""SearchParams: the layers of search settings (call, opener, version defaults) combine field by field."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from raggen.index.manifest import SearchDefaults
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.settings import SearchSettings


def test_a_set_field_wins_and_an_unset_one_comes_from_the_layer_below():
    call = SearchParams(nprobe=64)
    version = SearchParams(nprobe=8, ef_search=128, refine_k_factor=4.0)
    assert call.over(version) == SearchParams(64, 128, 4.0)
    assert NO_OVERRIDES.over(version) == version
    assert version.over(NO_OVERRIDES) == version
    assert SearchParams(refine_k_factor=1.0).over(version) == SearchParams(8, 128, 1.0)
    assert SearchParams(nprobe=2).over(SearchParams(ef_search=32)).over(NO_OVERRIDES) == SearchParams(2, 32, None)


def test_read_from_settings_and_a_manifests_defaults_and_none():
    assert SearchParams.of(SearchSettings(nprobe=16, refine_k_factor=2.0)) == SearchParams(16, None, 2.0)
    assert SearchParams.of(SearchDefaults(ef_search=256, recall=0.99)) == SearchParams(None, 256, None)
    assert SearchParams.of(None) == NO_OVERRIDES
    assert SearchParams.of(SimpleNamespace(nprobe=1, ef_search=2, refine_k_factor=3.0)).as_kwargs() == {
        "nprobe": 1,
        "ef_search": 2,
        "refine_k_factor": 3.0,
    }


def test_pickles_small_and_whole():
    """It travels in every direct call to a shard actor."""
    p = SearchParams(nprobe=4, refine_k_factor=8.0)
    assert pickle.loads(pickle.dumps(p, pickle.HIGHEST_PROTOCOL)) == p
    assert len(pickle.dumps(p, pickle.HIGHEST_PROTOCOL)) < 120
    # as its three fields (__reduce__), not a slotted dataclass's state dict
    assert SearchParams.__reduce__(p) == (SearchParams, (4, None, 8.0))
    assert b"__getstate__" not in pickle.dumps(p, 0) and b"nprobe" not in pickle.dumps(p, pickle.HIGHEST_PROTOCOL)
