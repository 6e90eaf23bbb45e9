"""Which Ray cluster a command joins: the one a plain ``ray.init()`` would join, or none.

``raggen serve --detach`` and ``raggen serve swap`` must never start a Ray instance of their own
(it would end with the command, and the service with it): they rely on
``running_cluster_address``, which reads Ray's own lookup (RAY_ADDRESS, else the address file that
``ray start`` writes in Ray's temp dir). These tests pin that lookup on the pinned Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys

from raggen.ray_utils import running_cluster_address
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


def test_serve_detach_without_a_cluster_is_refused_before_ray_starts(tmp_path):
    """The documents quickstart's `raggen serve CONFIG --detach` in a fresh shell: one error line
    that says to start a cluster, and no Ray instance started (none would outlive the command)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "raggen.cli", "serve", "configs/documents.yaml", "--detach"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("raggen: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "serve --detach: no running Ray cluster" in errors[0] and "ray start --head" in errors[0]
    assert not (tmp_path / "ray").exists(), "a Ray instance was started"
