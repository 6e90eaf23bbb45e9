"""Every YAML file shipped in configs/ loads with the loader that reads it.

A raggen config (sections world/index/model/train/serve) goes through
``raggen.config.load_config``; a Ray Serve config (top-level ``applications:``, for ``serve
deploy`` or a RayService) through Ray's own ``ServeDeploySchema`` and raggen's ``AppArgs``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and data, f"{path.name}: expected a non-empty mapping"
    return data


def is_serve_config(path: Path) -> bool:
    return "applications" in _raw(path)


RAGGEN_CONFIGS = [p for p in CONFIGS if not is_serve_config(p)]
SERVE_CONFIGS = [p for p in CONFIGS if is_serve_config(p)]


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (str(key),))
    else:
        yield path, node


def _lookup(model: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        model = model[key] if isinstance(model, dict) else getattr(model, key)
    return model


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert "quickstart.yaml" in names, "configs/quickstart.yaml (make demo) is missing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_a_comment_header(path):
    """Each config says what it is for and how to launch it before its first key."""
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), f"{path.name}: no header comment"


@pytest.mark.parametrize("path", RAGGEN_CONFIGS, ids=lambda p: p.name)
def test_raggen_config_loads(path):
    from raggen.config import RaggenConfig, load_config

    cfg = load_config(path)
    assert isinstance(cfg, RaggenConfig)
    # every value written in the file arrives in the model (nothing renamed or dropped on the way)
    raw = _raw(path)
    for keys, value in _leaves(raw):
        got = _lookup(cfg, keys)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert got == pytest.approx(value), f"{path.name}: {'.'.join(keys)}"
        else:
            assert got == value, f"{path.name}: {'.'.join(keys)}"


@pytest.mark.parametrize("path", RAGGEN_CONFIGS, ids=lambda p: p.name)
def test_raggen_config_numbers_are_yaml_numbers(path):
    """PyYAML reads ``3e-5`` (no dot) as a string; pydantic would quietly coerce it. Write 3.0e-5."""
    from raggen.config import load_config

    cfg = load_config(path)
    for keys, value in _leaves(_raw(path)):
        got = _lookup(cfg, keys)
        if isinstance(value, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
            pytest.fail(f"{path.name}: {'.'.join(keys)} = {value!r} is a string in YAML; write it as a number")


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_for_ray_and_raggen(path):
    from ray.serve.schema import ServeDeploySchema

    from raggen.serve.app import IMPORT_PATH, parse_app_args

    raw = _raw(path)
    ServeDeploySchema.model_validate(raw)
    apps = [a for a in raw["applications"] if a["import_path"] == IMPORT_PATH]
    assert apps, f"{path.name}: no application imports {IMPORT_PATH}"
    for app in apps:
        args = parse_app_args(app.get("args"))
        deployments = {d["name"]: d for d in app.get("deployments", [])}
        if "Retriever" in deployments:
            # the hot-swap handle must name the index the args name, or a deploy would flip it
            assert deployments["Retriever"]["user_config"] == args.index_user_config()
