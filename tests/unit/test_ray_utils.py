"""Which Ray cluster a command joins: the one a plain ``ray.init()`` would join, or none.

``raggen serve --detach`` and ``raggen serve swap`` must never start a Ray instance of their own
(it would end with the command, and the service with it): they rely on
``running_cluster_address``, which reads Ray's own lookup (RAY_ADDRESS, else the address file that
``ray start`` writes in Ray's temp dir). These tests pin that lookup on the pinned Ray.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from raggen.errors import RaggenError
from raggen.ray_utils import check_cluster_answers, gcs_host_port, running_cluster_address
from tests.helpers import REPO


def _no_cluster_env(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # an empty temp dir: no `ray start` address file


def test_no_address_and_no_address_file_is_no_cluster(monkeypatch, tmp_path):
    _no_cluster_env(monkeypatch, tmp_path)
    assert running_cluster_address() is None


def test_the_address_file_of_ray_start_is_joined(monkeypatch, tmp_path):
    _no_cluster_env(monkeypatch, tmp_path)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6390\n")  # what `ray start` writes
    assert running_cluster_address() == "127.0.0.1:6390"


def test_ray_address_wins(monkeypatch, tmp_path):
    _no_cluster_env(monkeypatch, tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert running_cluster_address() == "10.0.0.7:6379"


def _serve_detach_error(ray_tmpdir) -> str:
    """`raggen serve configs/documents.yaml --detach` with no RAY_ADDRESS and Ray's temp dir at
    ``ray_tmpdir``: it must exit 2 with one error line, returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    proc = subprocess.run(
        [sys.executable, "-m", "raggen.cli", "serve", "configs/documents.yaml", "--detach"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("raggen: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_serve_detach_without_a_cluster_is_refused_before_ray_starts(tmp_path):
    """The documents quickstart's `raggen serve CONFIG --detach` in a fresh shell: one error line
    that says to start a cluster, and no Ray instance started (none would outlive the command)."""
    error = _serve_detach_error(tmp_path)
    assert "serve --detach: no running Ray cluster" in error and "ray start --head" in error
    assert not (tmp_path / "ray").exists(), "a Ray instance was started"


def _dead_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_addresses_that_are_host_and_port_are_probed_others_left_to_ray():
    assert gcs_host_port("10.0.0.7:6379") == ("10.0.0.7", 6379)
    assert gcs_host_port("ray://head:10001") == ("head", 10001)
    assert gcs_host_port("[::1]:6379") == ("::1", 6379)
    assert gcs_host_port("auto") is None and gcs_host_port("local") is None
    assert gcs_host_port("http://127.0.0.1:8265") is None  # the dashboard's, for `ray job submit`


def test_a_cluster_that_does_not_answer_is_refused_at_once_naming_where_its_address_came_from():
    dead = f"127.0.0.1:{_dead_port()}"
    with pytest.raises(RaggenError, match=rf"cluster at {dead} does not answer.*RAY_ADDRESS"):
        check_cluster_answers(dead, explicit=True)
    with pytest.raises(RaggenError, match="`ray stop` clears it"):
        check_cluster_answers(dead, explicit=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_cluster_answers(f"127.0.0.1:{listening.getsockname()[1]}", explicit=True)  # answers: no error
    check_cluster_answers(None, explicit=False)  # no cluster named: nothing to check


def test_a_stale_ray_start_address_file_is_an_error_not_minutes_of_retries(tmp_path):
    """A cluster that died without `ray stop` leaves its address file; `ray.init` would retry that
    address for minutes. The command says what happened in one line instead."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}\n")
    error = _serve_detach_error(tmp_path)
    assert "does not answer" in error and "`ray stop` clears it" in error


def test_the_head_node_resource_is_rays_own_name():
    """The shard-group registry is placed with the head node's built-in resource; a name Ray does not
    know would leave it pending forever (tests/integration/test_index_actors.py places it for real)."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from raggen.index.shared_groups import HEAD_NODE_RESOURCE

    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME
