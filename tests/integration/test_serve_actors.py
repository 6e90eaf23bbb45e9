"""The Serve Retriever searching through shard actors (``index_search.mode: actors``), over HTTP.

Two versions (v1, v2) of a Flat index over random vectors of the tiny query encoder's dimension,
with ~30 MB of incompressible passage text each, behind a Serve app with TWO Retriever replicas:

- both replicas search through ONE shared group of shard actors (the ``ShardGroupRegistry`` lends
  it, two leases), and ``/v1/answer`` returns exactly the top-k ids of the same version opened
  locally and searched with the same query encoder;
- a hot swap to v2 under a client loop fails no request; afterwards the v1 group's actors are
  gone and the replicas' RSS grew by much less than v2's passage text (it stays in the actors);
- a shard actor killed (SIGKILL) under a client loop is started again and fails no request;
- when the group registry dies (and the group's actors with it), the replicas borrow a new group
  from a new registry and no request fails.

Every replica and actor asks for a fraction of a CPU (2 cores in all).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from raggen.index import (  # noqa: E402
    SearchSettings,
    make_manifest,
    open_index,
    passages_table,
    publish_version,
    write_parquet_atomic,
)
from raggen.index.shard import build_shard_index, write_index_file  # noqa: E402
from raggen.index.shared_groups import REGISTRY_NAME, REGISTRY_NAMESPACE  # noqa: E402
from raggen.models import TextEncoder, make_tiny_encoder, make_tiny_generator  # noqa: E402
from raggen.serve.app import deploy_config, serve_deploy_config, wait_until_running, with_index  # noqa: E402
from raggen.testing import wait_for

_wait_for = functools.partial(wait_for, poll_s=0.25, retry_on=(Exception,))

pytestmark = pytest.mark.integration

N = 12_000  # passages per version
TEXT_CHARS = 2_500  # incompressible hex: ~30 MB of text per version
TOP_K = 5
QUESTIONS = [f"question number {i} about topic {i * 7 % 13}" for i in range(6)]
ENCODER = {"pooling": "mean", "max_length": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _write_version(root, version: str, xb: np.ndarray, texts: list[str]) -> None:
    work = root.parent / f"work-{version}"
    work.mkdir(parents=True)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(len(xb)), 2)):
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        ipath, ppath = work / f"shard-{s:05d}.faiss", work / f"shard-{s:05d}.parquet"
        write_index_file(build_shard_index(xb[rows], ids, factory="Flat"), ipath)
        write_parquet_atomic(passages_table(ids, [f"{version}-p{r}" for r in rows], [f"title {r}" for r in rows],
                                            [texts[r] for r in rows], None), ppath)  # fmt: skip
        files.append((ipath, ppath, len(rows)))
    manifest = make_manifest(version, encoder_name_or_path="tiny", pooling="mean", dim=xb.shape[1], metric="ip",
                             faiss_factory="Flat", shard_files=files)  # fmt: skip
    publish_version(str(root), manifest, work)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-actors")
    encoder = make_tiny_encoder(str(base / "encoder"))
    generator = make_tiny_generator(str(base / "generator"))
    dim = TextEncoder.from_pretrained(encoder, **ENCODER).dim
    root = base / "index"
    text_bytes = {}
    for n, version in enumerate(("v1", "v2")):
        rng = np.random.default_rng(n)
        xb = rng.standard_normal((N, dim)).astype(np.float32)
        texts = [os.urandom(TEXT_CHARS // 2).hex() for _ in range(N)]
        _write_version(root, version, xb, texts)
        text_bytes[version] = sum(len(t) for t in texts)
    return SimpleNamespace(root=str(root), encoder=encoder, generator=generator, text_bytes=text_bytes)


@pytest.fixture(scope="module")
def service(ray_cluster, world):
    port = _free_port()
    args = {
        "index": world.root, "index_version": "v1",
        "index_search": {"mode": "actors", "actor_num_cpus": 0.25},
        "query_encoder": {"name_or_path": world.encoder, **ENCODER},
        "generator": world.generator, "max_source_length": 64, "max_target_length": 4, "num_beams": 1,
        "default_top_k": TOP_K, "max_top_k": 8, "max_new_tokens": 2,
        "replica_num_cpus": 0.1, "ingress_num_cpus": 0.05, "max_batch_size": 4, "batch_wait_timeout_s": 0.005,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "deployments": {"retriever": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}},
    }  # fmt: skip
    config = serve_deploy_config(args, host="127.0.0.1", port=port)
    deploy_config(config)
    try:
        wait_until_running(timeout_s=240)
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 60, "/healthz")
        yield SimpleNamespace(url=url, config=config, http=httpx.Client(base_url=url, timeout=60))
    finally:
        serve.shutdown()


def _ask(service, question: str) -> dict:
    r = service.http.post("/v1/answer", json={"question": question, "top_k": TOP_K, "decoding": "rag-token",
                                             "max_new_tokens": 2, "num_beams": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def _replicas(expect: int = 2) -> dict[int, dict]:
    """Each Retriever replica's ``replica_info``, by pid (asked until ``expect`` replicas answered)."""
    handle = serve.get_deployment_handle("Retriever", app_name="raggen")
    seen: dict[int, dict] = {}
    for _ in range(60):
        info = handle.replica_info.remote().result(timeout_s=30)
        seen[info["pid"]] = info
        if len(seen) >= expect:
            break
    assert len(seen) == expect, f"saw {len(seen)} Retriever replicas"
    return seen


def _groups() -> dict[str, dict]:
    registry = ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
    return ray.get(registry.groups.remote(), timeout=30)


class _ClientStream:
    """Two client threads asking ``/v1/answer`` in a loop while the ``with`` block runs: the non-200
    replies and transport errors in ``failures``, the index versions answered in ``versions``."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.count = 0
        self.threads = [threading.Thread(target=self._client) for _ in range(2)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                q = QUESTIONS[self.count % len(QUESTIONS)]
                try:
                    r = http.post("/v1/answer", json={"question": q, "top_k": TOP_K, "decoding": "rag-token",
                                                      "max_new_tokens": 2, "num_beams": 1})  # fmt: skip
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        self.versions.add(r.json()["index_version"])
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.count += 1

    def __enter__(self) -> _ClientStream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_replicas_share_one_actor_group_and_answer_as_the_local_index(service, world):
    replicas = _replicas()
    assert {i["backend"] for i in replicas.values()} == {"actors"}
    assert len({i["actor_group"] for i in replicas.values()}) == 1, "one group for both replicas"
    groups = _groups()
    assert [(g["version"], g["leases"]) for g in groups.values()] == [("v1", 2)]
    actors = next(iter(groups.values()))["group"].info()
    assert all(not any(a["embeddings_loaded"]) for a in actors)

    encoder = TextEncoder.from_pretrained(world.encoder, **ENCODER)
    local = open_index(world.root, "v1", settings=SearchSettings(mode="local"), load_embeddings=False)
    try:
        want = local.search(encoder.encode(QUESTIONS).numpy(), TOP_K, embeddings=False)
    finally:
        local.close()
    for i, question in enumerate(QUESTIONS):
        reply = _ask(service, question)
        assert reply["index_version"] == "v1"
        assert [p["id"] for p in reply["passages"]] == want.ids[i]
        assert [p["text"] for p in reply["passages"]] == want.texts[i]
        np.testing.assert_allclose([p["score"] for p in reply["passages"]], want.scores[i], rtol=1e-4, atol=1e-4)


def test_hot_swap_under_load_fails_nothing_and_ends_the_old_group(service, world):
    for question in QUESTIONS:  # warm: both replicas have served requests before the baseline
        _ask(service, question)
    before = {pid: _rss(pid) for pid in _replicas()}
    (old,) = [g["group"] for g in _groups().values() if g["version"] == "v1"]

    with _ClientStream(service.url) as stream:
        time.sleep(1.0)
        deploy_config(with_index(service.config, world.root, "v2"))
        _wait_for(lambda: [(g["version"], g["leases"]) for g in _groups().values()] == [("v2", 2)], 120,
                  "both replicas on the v2 group and the v1 group given back")  # fmt: skip
        _wait_for(lambda: "v2" in stream.versions, 30, "answers from v2")
        time.sleep(1.0)
    assert stream.failures == [], stream.failures[:5]
    assert stream.versions == {"v1", "v2"} and stream.count > 10

    def gone() -> bool:
        for h in old.handles:
            try:
                ray.get(h.ready.remote(), timeout=5)
                return False
            except ray.exceptions.RayActorError:
                continue
        return True

    _wait_for(gone, 30, "the v1 group's actors to end")
    after = _replicas()
    assert {i["version"] for i in after.values()} == {"v2"} and {i["backend"] for i in after.values()} == {"actors"}
    text = world.text_bytes["v2"]
    growth = {pid: _rss(pid) - rss for pid, rss in before.items()}
    print(
        f"\nRetriever RSS growth over the swap to v2: {[round(g / 2**20, 1) for g in growth.values()]} MiB; "
        f"v2 passage text {text / 2**20:.1f} MiB"
    )
    assert all(g < 0.5 * text for g in growth.values()), "a Retriever replica must not hold the passages"


def test_a_killed_shard_actor_fails_no_request(service):
    """SIGKILL one shard actor of the live group under a client stream: Ray starts it again in its
    bundle, the searches it held are sent again, and no request fails."""
    import signal

    (entry,) = _groups().values()
    group = entry["group"]
    victim = group.info()[0]
    with _ClientStream(service.url) as stream:
        _wait_for(lambda: stream.count >= 4, 30, "answers before the kill")
        os.kill(victim["pid"], signal.SIGKILL)
        _wait_for(lambda: group.info()[0]["pid"] != victim["pid"], 60, "the shard actor started again")
        answered = stream.count
        _wait_for(lambda: stream.count >= answered + 4, 30, "answers after the restart")
    assert stream.failures == [], stream.failures[:5]
    assert [(g["version"], g["leases"]) for g in _groups().values()] == [(entry["version"], 2)], "the same group"


def test_groups_lost_with_their_registry_are_borrowed_again_and_no_request_fails(service):
    """Kill the group registry (the owner of every shared group's actors, which end with it) under a
    client stream: each Retriever replica whose search hit the lost actors borrows a new group for
    the same version from a new registry and searches again; no request fails."""
    (entry,) = _groups().values()
    old = entry["group"]
    with _ClientStream(service.url) as stream:
        _wait_for(lambda: stream.count >= 4, 30, "answers before the kill")
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE))
        _wait_for(lambda: [(g["version"], g["leases"]) for g in _groups().values()] == [(entry["version"], 2)],
                  120, "a new registry lending a new group to both replicas")  # fmt: skip
        answered = stream.count
        _wait_for(lambda: stream.count >= answered + 4, 30, "answers from the new group")
    assert stream.failures == [], stream.failures[:5]
    (new,) = [g["group"] for g in _groups().values()]
    assert new.name != old.name and not old.alive(timeout_s=5)
    assert {i["actor_group"] for i in _replicas().values()} == {new.name}
