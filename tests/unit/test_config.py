"""Configs: defaults validate, overrides apply, and every bad value names its field in one line."""

import subprocess
import sys

import pytest

from raggen.config import load_config, parse_override
from raggen.errors import ConfigError


def test_defaults_and_overrides_apply():
    cfg = load_config(overrides=["train.lr=3e-5", "train.estimator=vrag", "serve.autoscaling.max_replicas=4"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.train.estimator == "vrag"
    assert cfg.serve.autoscaling.max_replicas == 4


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("train.estimatr=jsa", "train.estimatr"),
        ("train.estimator=gibbs", "train.estimator"),
        ("index.num_shards=abc", "index.num_shards"),
        ("serve.port=70000", "serve.port"),
        ("train.jsa.retriever_temperature=0", "train.jsa.retriever_temperature"),
        ("serve.autoscaling.min_replicas=9", "serve.autoscaling"),
        ("train.refresh_index_every=5", "train"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert f"<defaults>: {field}:" in message
    assert "\n" not in message


def test_index_section_is_the_build_settings_plus_its_own_fields():
    """``index`` inherits ``IndexBuildSettings`` (declared once in raggen.index): the same YAML keys,
    defaults and constraints; its build part is the frozen library object ``build_index`` takes."""
    from pydantic import ValidationError

    from raggen.app.indexing import index_build_settings
    from raggen.config import IndexSection
    from raggen.index import IndexBuildSettings

    assert issubclass(IndexSection, IndexBuildSettings)
    assert index_build_settings(load_config().index) == IndexBuildSettings()
    cfg = load_config(overrides=["index.num_shards=4", "index.sparse=bm25", "index.actor_num_gpus=null"])
    settings = index_build_settings(cfg.index)
    assert type(settings) is IndexBuildSettings
    assert (settings.num_shards, settings.sparse, settings.actor_num_gpus) == (4, "bm25", None)
    with pytest.raises(ValidationError):
        settings.num_shards = 3  # the library's object is frozen ...
    cfg.index.num_shards = 3  # ... the config section is not (validated on assignment)
    with pytest.raises(ValidationError):
        cfg.index.num_shards = 0
    with pytest.raises(ConfigError, match="index.batch_size"):
        load_config(overrides=["index.batch_size=0"])
    assert all(f.description for f in IndexBuildSettings.model_fields.values())


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: invalid YAML"):
        load_config(bad)
    notutf8 = tmp_path / "latin1.yaml"
    notutf8.write_bytes("train:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(notutf8)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_file_values_are_validated_with_the_file_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  top_k: 0\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: train\.top_k: Input should be greater than or equal to 1 \(got 0\)"
    ):
        load_config(cfg)


def test_override_parsing():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_override_values_with_colons_are_text_unless_an_explicit_collection():
    """A prompt such as E5's ``query: `` reads as YAML's block mapping {query: null}; a --set line
    cannot hold a block mapping, so it is the text as typed. Unreadable YAML is text too (was a crash)."""
    assert parse_override("index.encoder.query_prefix=query: ") == (["index", "encoder", "query_prefix"], "query: ")
    assert parse_override("x=Represent this sentence: for: search: ")[1] == "Represent this sentence: for: search: "
    assert parse_override("x=- item")[1] == "- item"
    assert parse_override("x={a: 1}")[1] == {"a": 1} and parse_override("x=[1, 2]")[1] == [1, 2]
    assert parse_override('x="quoted: "')[1] == "quoted: "
    assert parse_override("x=0.5")[1] == 0.5 and parse_override("x=7")[1] == 7
    cfg = load_config(
        "configs/quickstart.yaml", ["index.encoder.query_prefix=query: ", "index.encoder.passage_prefix=passage: "]
    )
    assert (cfg.index.encoder.query_prefix, cfg.index.encoder.passage_prefix) == ("query: ", "passage: ")


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "raggen.cli", "world", "--set", "world.num_entities=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "raggen: error: <defaults>: world.num_entities: Input should be greater than or equal to 50 (got 3)"
    ]


def test_relative_paths_become_absolute_but_hub_ids_stay(tmp_path, monkeypatch):
    from raggen.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reader").mkdir()
    cfg = with_absolute_paths(
        load_config(
            overrides=["model.generator=reader", "model.reranker=org/some-reranker", "train.index=s3://bucket/index"]
        )
    )
    assert cfg.model.generator == str(tmp_path / "reader")
    assert cfg.model.reranker == "org/some-reranker"
    assert cfg.train.index == "s3://bucket/index"
    assert cfg.train.storage_path == str(tmp_path / "runs")
    assert cfg.model.query_encoder.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


def test_one_model_for_questions_and_passages_must_pool_and_normalise_alike():
    with pytest.raises(ConfigError, match=r"model.query_encoder.pooling is 'mean' but index.encoder.pooling is 'cls'"):
        load_config("configs/quickstart.yaml", ["index.encoder.pooling=cls"])
    with pytest.raises(
        ConfigError, match=r"model.query_encoder.normalize is False but index.encoder.normalize is True"
    ):
        load_config("configs/quickstart.yaml", ["index.encoder.normalize=true"])
    both = load_config(
        "configs/quickstart.yaml", ["index.encoder.normalize=true", "model.query_encoder.normalize=true"]
    )
    assert both.index.encoder.normalize and both.model.query_encoder.normalize
    # two models (DPR's question and context encoders) are the recipe's own business
    two = load_config("configs/quickstart.yaml", ["index.encoder.name_or_path=other/ctx", "index.encoder.pooling=cls"])
    assert two.index.encoder.pooling == "cls" and two.model.query_encoder.pooling == "mean"
