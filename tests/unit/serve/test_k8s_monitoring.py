"""The RayService can be watched: every Ray pod exports metrics on a port named ``metrics``, and
the gpu-prod overlay's PodMonitor selects exactly the RayService's pods and scrapes that port."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import REPO

RAYSERVICE = REPO / "k8s" / "base" / "rayservice.yaml"
PODMONITOR = REPO / "k8s" / "overlays" / "gpu-prod" / "podmonitor.yaml"


def _load(path: Path) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return json.loads(json.dumps(doc))  # YAML aliases become plain copies


def _pod_groups(service: dict) -> list[dict]:
    spec = service["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_every_ray_pod_exports_metrics_on_a_named_port():
    for group in _pod_groups(_load(RAYSERVICE)):
        port = group["rayStartParams"]["metrics-export-port"]
        (container,) = group["template"]["spec"]["containers"]
        assert {"containerPort": int(port), "name": "metrics"} in container["ports"]


def test_podmonitor_selects_the_rayservice_pods_and_scrapes_that_port():
    monitor, service = _load(PODMONITOR), _load(RAYSERVICE)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    for group in _pod_groups(service):
        labels = group["template"]["metadata"]["labels"]
        assert wanted.items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    overlay = yaml.safe_load((PODMONITOR.parent / "kustomization.yaml").read_text())
    assert monitor["metadata"]["namespace"] == overlay["namespace"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [overlay["namespace"]]
