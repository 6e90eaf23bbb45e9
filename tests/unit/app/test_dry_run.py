"""The dry run rehearses exactly the model classes each shipped config names (no network: stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raggen.app.dry_run import dry_run_overrides, model_fields, small_factory, stand_in_overrides
from raggen.config import load_config
from raggen.errors import ConfigError
from raggen.models.loading import declared_architecture
from raggen.models.stand_ins import BUILDERS, architecture_of, is_available_here, make_stand_in
from tests.helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RAGGEN_CONFIGS = [p for p in CONFIGS if "applications" not in yaml.safe_load(p.read_text())]
SERVE_CONFIGS = [p for p in CONFIGS if p not in RAGGEN_CONFIGS]


def _named_models(path: Path) -> list[str]:
    if path in RAGGEN_CONFIGS:
        return list(model_fields(load_config(path)).values())
    names = []
    for app in yaml.safe_load(path.read_text())["applications"]:
        args = app.get("args", {})
        names += [args.get("query_encoder", {}).get("name_or_path"), args.get("generator"), args.get("reranker")]
    return [n for n in names if n]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_model_a_shipped_config_names_is_exercised_by_the_dry_run(path, monkeypatch):
    """Each named model either loads here as it is, or has a stand-in of the class it declares;
    a config naming a class the dry run cannot build fails here."""
    monkeypatch.chdir(REPO)
    for name in _named_models(path):
        if name.startswith("s3://"):
            continue  # the run's own trained output (serve.model_dir), produced by the dry run itself
        if is_available_here(name):
            continue
        assert architecture_of(name) in BUILDERS, f"{path.name}: {name} ({architecture_of(name)}) has no stand-in"


def test_the_real_recipe_gets_stand_ins_of_its_own_classes(tmp_path):
    cfg = load_config(REPO / "configs" / "wiki-dpr-21m.yaml")
    lines = dict(line.split("=", 1) for line in stand_in_overrides(cfg, tmp_path))
    assert set(lines) == {"index.encoder.name_or_path", "model.query_encoder.name_or_path", "model.generator"}
    assert declared_architecture(lines["index.encoder.name_or_path"]) == "DPRContextEncoder"
    assert declared_architecture(lines["model.query_encoder.name_or_path"]) == "DPRQuestionEncoder"
    assert declared_architecture(lines["model.generator"]) == "BartForConditionalGeneration"


def test_dry_run_overrides_only_touch_models_sizes_and_paths(tmp_path):
    config = REPO / "configs" / "wiki-dpr-21m.yaml"
    lines = dry_run_overrides(str(config), tmp_path, s3_endpoint="http://127.0.0.1:9")
    fields = {line.split("=", 1)[0] for line in lines}
    assert {"index.passages", "train.index", "serve.index"}.isdisjoint(fields)  # s3:// URIs kept on the endpoint
    assert "index.s3.endpoint_url" in fields and "train.estimator" not in fields
    cfg = load_config(config, lines)  # the overridden config still validates
    assert cfg.train.estimator == "jsa" and cfg.index.metric == "ip" and cfg.index.encoder.pooling == "cls"
    assert cfg.index.faiss_factory == "IVF8,PQ64,Refine(SQfp16)" and cfg.train.num_workers == 2
    local = dry_run_overrides(str(config), tmp_path / "local")
    assert all("s3://" not in line for line in local)


@pytest.mark.parametrize(
    "factory,small",
    [
        ("IVF65536,PQ64", "IVF8,PQ64"),
        ("Flat", "Flat"),
        ("HNSW32", "HNSW32"),
        ("OPQ64,IVF4096_HNSW32,PQ64", "OPQ64,IVF8_HNSW32,PQ64"),
    ],
)
def test_small_factory_keeps_the_index_family(factory, small):
    assert small_factory(factory) == small


def test_an_unknown_hub_id_is_refused_rather_than_rehearsed_with_another_class(tmp_path):
    with pytest.raises(ConfigError, match="no stand-in known"):
        make_stand_in("some-org/mystery-model", str(tmp_path / "m"))


@pytest.mark.parametrize(
    "name,arch",
    [
        ("facebook/dpr-ctx_encoder-multiset-base", "DPRContextEncoder"),
        ("google/flan-t5-base", "T5ForConditionalGeneration"),
        ("meta-llama/Llama-3.2-1B-Instruct", "LlamaForCausalLM"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM"),
    ],
)
def test_stand_ins_are_built_as_the_class_the_hub_id_declares(tmp_path, name, arch):
    path = make_stand_in(name, str(tmp_path / "m"))
    assert declared_architecture(path) == arch
