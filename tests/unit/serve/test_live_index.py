"""The Retriever's live index without Ray: loaded through the ``index.search`` settings (local here:
no embedding column, the version's tuned nprobe unless the settings give one), a swapped-out version
closed only once no request pins it, and the shard-group registry's lending rules (one start per
key, the group ended with its last lease)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from raggen.errors import IndexIntegrityError
from raggen.index import SearchSettings
from raggen.index import actors as A
from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version
from raggen.index.shared_groups import ShardGroupRegistry, group_key
from raggen.serve.index_holder import IndexHolder
from raggen.serve.live_index import LiveIndex, load_live_index

D = 16


def publish(tmp_path, factory: str = "IVF8,Flat", n: int = 800) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, D)).astype(np.float32)
    out = tmp_path / "files"
    out.mkdir()
    trained = S.train_index(xb, factory=factory, train_sample=n)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), 2)):
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        ipath, ppath = out / f"shard-{s:05d}.faiss", out / f"shard-{s:05d}.parquet"
        S.write_index_file(S.build_shard_index(xb[rows], ids, factory=factory, trained_index=trained), ipath)
        write_parquet_atomic(passages_table(ids, [f"p{r}" for r in rows], [f"t{r}" for r in rows],
                                            [f"x{r}" for r in rows], xb[rows]), ppath)  # fmt: skip
        files.append((ipath, ppath, len(rows)))
    manifest = M.make_manifest("v1", encoder_name_or_path="x", pooling="mean", dim=D, metric="ip", faiss_factory=factory,
                               shard_files=files, search_defaults={"nprobe": 2})  # fmt: skip
    publish_version(str(tmp_path / "root"), manifest, out)
    return str(tmp_path / "root"), xb


def test_local_load_skips_embeddings_and_uses_the_tuned_nprobe(tmp_path):
    root, xb = publish(tmp_path)
    live = load_live_index(root, None, expect_dim=D)  # no settings: local, as before
    assert live.version == "v1" and live.backend == "local" and live.num_passages == len(xb)
    assert live.index.params.nprobe == 2  # the version's search_defaults
    assert all(s._emb is None for s in live.index._backend.searchers)  # serving never loads the column
    result = live.index.search(xb[:3], 4, embeddings=False)
    assert result.ids[0][0] == "p0" and result.texts[0][0] == "x0"
    overridden = load_live_index(root, "v1", settings=SearchSettings(mode="auto", nprobe=8))  # auto: small -> local
    assert overridden.backend == "local" and overridden.index.params.nprobe == 8
    with pytest.raises(IndexIntegrityError, match="16-d but the query encoder gives 32-d"):
        load_live_index(root, None, expect_dim=32)
    # the passages' own model (x, mean-pooled) asking with CLS states: refused; other models are theirs to pair
    with pytest.raises(IndexIntegrityError, match="passages were mean-pooled by x, but the query encoder.*pools cls"):
        load_live_index(root, None, expect_dim=D, expect_encoder=("x", "cls"))
    for fits in (("x", "mean"), ("a-question-encoder", "cls")):
        load_live_index(root, None, expect_dim=D, expect_encoder=fits).close()
    live.close()
    overridden.close()


class Closing:
    """A stand-in index that records its close()."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def test_a_swapped_out_version_closes_only_after_the_requests_that_pinned_it():
    made: dict[str, Closing] = {}

    def load(root: str, version: str | None) -> LiveIndex:
        made[version] = Closing()
        return LiveIndex(root=root, version=version, index=made[version], num_passages=1, loaded_at=0.0)

    holder = IndexHolder(load, lambda root: "v1", retry_backoff_s=0.0)
    assert holder.configure("/idx", "v1")
    with holder.use() as live:
        assert holder.in_flight() == 1
        assert holder.swap_to("/idx", "v2") and holder.live.version == "v2"
        assert live.version == "v1" and made["v1"].closed == 0  # still searched by this request
    assert made["v1"].closed == 1 and made["v2"].closed == 0 and holder.in_flight() == 0
    assert holder.swap_to("/idx", "v3") and made["v2"].closed == 1  # nothing pinned it: closed at once
    holder.close()
    assert made["v3"].closed == 1


class FakeGroup:
    starts = 0

    def __init__(self, uri: str, **_):
        FakeGroup.starts += 1
        time.sleep(0.05)  # a slow start: concurrent first callers must wait for this one
        self.name, self.version, self.closed, self.ok = f"g{FakeGroup.starts}", uri, False, True

    def alive(self) -> bool:
        return self.ok

    def close(self):
        self.closed = True


def test_registry_starts_one_group_per_key_and_ends_it_with_the_last_lease(monkeypatch):
    monkeypatch.setattr(A.ShardActorGroup, "start", staticmethod(lambda **kw: FakeGroup(**kw)))
    FakeGroup.starts = 0
    registry = ShardGroupRegistry()
    key = group_key("/idx/v1", SearchSettings(mode="actors"), False)
    got: list = []
    threads = [threading.Thread(target=lambda n=n: got.append(registry.acquire(key, f"r{n}", None, {"uri": "v1"})))
               for n in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FakeGroup.starts == 1 and len({id(g) for g in got}) == 1
    assert registry.groups()[key]["leases"] == 3
    assert not registry.release("r0") and not registry.release("r1") and not got[0].closed
    assert registry.release("r2") and got[0].closed and registry.groups() == {}
    assert not registry.release("r2")  # returned twice: nothing happens
    again = registry.acquire(key, "r3", None, {"uri": "v1"})
    again.ok = False  # its actors died: the next caller gets a fresh group, the broken one is ended
    fresh = registry.acquire(key, "r4", None, {"uri": "v1"})
    assert fresh is not again and again.closed and FakeGroup.starts == 3
    other = group_key("/idx/v1", SearchSettings(mode="actors", nprobe=4), False)
    assert other != key  # settings that shape the actors are part of the key
