"""Every raggen setting as a pydantic model: YAML in, validated, one clear error naming the field out.

A config file has one section per flow (``world``, ``index``, ``model``, ``train``, ``serve``); each
command reads the sections it needs. CLI overrides use dotted paths: ``--set train.lr=3e-5``.
Sections that a library uses are that library's own frozen settings classes (``EncoderSpec``,
``ModelSpec``, ``LoopSettings``, ``StepSettings``, ``IndexBuildSettings``, ``SearchSettings``,
``ServingSettings``), embedded or
inherited here, so each setting is declared once; library modules never import this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raggen.errors import ConfigError
from raggen.index.build_settings import IndexBuildSettings
from raggen.index.settings import SearchSettings
from raggen.models.specs import EncoderSpec, ModelSpec
from raggen.retrieval.settings import RetrievalSettings
from raggen.serve.settings import (  # noqa: F401 - the serve section embeds them; re-exported
    AutoscalingOverride,
    AutoscalingSection,
    DeploymentSection,
    ServeDeploymentsSection,
    ServingSettings,
)
from raggen.train.settings import GumbelSettings, JSASettings, LoopSettings, StepSettings


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a YAML file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(_Strict):
    """Where S3 lives; unset fields fall back to the standard AWS environment (AWS_ENDPOINT_URL, ...)."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = Field(5, ge=1, le=50)

    def storage_options(self) -> dict[str, Any] | None:
        """As ``raggen.storage.S3Options`` fields; None when nothing is set (the AWS environment rules)."""
        out = {"endpoint_url": self.endpoint_url, "region_name": self.region}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, "max_attempts": self.max_attempts} if out else None


class WorldSection(_Strict):
    """The embedded generated knowledge base (raggen/corpus/world.py)."""

    out_dir: str = "artifacts/world"
    num_entities: int = Field(2000, ge=50)  # fewer leaves the name pools too small to draw distinct towns
    seed: int = 0
    changed_fraction: float = Field(0.1, ge=0.0, le=1.0)


EncoderSection = EncoderSpec  # the library's own settings object is the config section


class IndexSection(IndexBuildSettings):
    """Corpus -> Ray Data encoding -> FAISS shards -> a published, versioned index. The build's
    settings come from ``IndexBuildSettings`` (``raggen.index.build_settings``, declared there once);
    the section adds the corpus, the output root, the encoder, the search settings and S3."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    passages: str = "artifacts/world/passages.tsv"
    format: Literal["auto", "dpr-tsv", "jsonl", "parquet"] = "auto"
    # passages: `passages` is a passage file/folder, encoded as it is (DPR's psgs_w100.tsv), unless
    # it is a .md/.txt file or a folder of them (documents then); documents: `passages` names
    # documents (JSONL/parquet with id, title, text, or .md/.txt files) cut into passages of
    # chunk_words words (consecutive windows share chunk_overlap words), ids "<doc_id>#<word offset>"
    input: Literal["passages", "documents"] = "passages"
    chunk_words: int = Field(100, ge=1)
    chunk_overlap: int = Field(0, ge=0)
    chunk_dir: str | None = None  # where chunked documents go (folder or s3://; default: a local temp folder)
    output: str = "artifacts/index"
    version: str | None = None
    encoder: EncoderSection = EncoderSection()
    search: SearchSettings = SearchSettings()  # how train / eval / serve search this index (raggen.index.settings)
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _chunking(self) -> IndexSection:
        if self.chunk_overlap >= self.chunk_words:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_words ({self.chunk_words})"
            )
        if self.input == "documents" and self.format == "dpr-tsv":
            raise ValueError(
                "format: dpr-tsv holds passages; documents are JSONL, parquet or .md/.txt files (format auto)"
            )
        return self

    def document_settings(self):
        """How documents become passages (``raggen.corpus.documents.DocumentSettings``)."""
        from raggen.corpus.documents import DocumentSettings

        fmt = "auto" if self.format == "dpr-tsv" else self.format
        return DocumentSettings(
            chunk_words=self.chunk_words, chunk_overlap=self.chunk_overlap, format=fmt, chunk_dir=self.chunk_dir
        )


ModelSection = ModelSpec
JSASection = JSASettings  # the library's own settings objects are the config sections
GumbelSection = GumbelSettings


class TrainSection(LoopSettings, StepSettings):
    """``raggen train``: the loop's and the estimator's settings (``raggen.train.settings``, declared
    there once) plus where the data, the index and the run live and how Ray Train runs it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    name: str = "quickstart"
    storage_path: str = "runs"
    train_file: str = "artifacts/world/train.jsonl"
    dev_file: str = "artifacts/world/dev.jsonl"
    index: str = "artifacts/index"
    train_passage_encoder: bool = False
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = None
    max_failures: int = Field(0, ge=-1)
    tensorboard: bool = False  # scalars to <run>/tensorboard (torch.utils.tensorboard or tensorboardX)
    mlflow_tracking_uri: str | None = None  # set: log to MLflow (pip install mlflow) through Ray's setup_mlflow
    mlflow_experiment: str = "raggen"
    refresh_index_every: int = Field(0, ge=0)
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.refresh_index_every and not self.train_passage_encoder:
            raise ValueError(
                "refresh_index_every needs train_passage_encoder: true (a frozen encoder never changes the index)"
            )
        return self


class ServeSection(ServingSettings):
    """``raggen serve``: where the service listens and what it serves; the fields it shares with
    ``build_app``'s args (limits, resources, autoscaling, faults) come from ``ServingSettings``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    index: str = "artifacts/index"
    model_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    # Serve's http_options: a request is bounded end to end (408)
    request_timeout_s: float | None = Field(120.0, gt=0)
    s3: S3Config = S3Config()


class RaggenConfig(_Strict):
    world: WorldSection = WorldSection()
    index: IndexSection = IndexSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    serve: ServeSection = ServeSection()
    retrieval: RetrievalSettings = RetrievalSettings()  # dense | sparse | hybrid, read by eval, retrieve, serve

    @model_validator(mode="after")
    def _one_model_one_geometry(self) -> RaggenConfig:
        """A model that encodes both the passages and the questions must turn both into vectors the
        same way: mean-pooled questions against CLS-pooled passages score noise, with no error."""
        q, i = self.model.query_encoder, self.index.encoder
        if q.name_or_path == i.name_or_path:
            for field in ("pooling", "normalize"):
                if getattr(q, field) != getattr(i, field):
                    raise ValueError(
                        f"model.query_encoder.{field} is {getattr(q, field)!r} but index.encoder.{field} is "
                        f"{getattr(i, field)!r}, for the same model {q.name_or_path}: set both alike"
                    )
        return self


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "<root>"


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: ``file: train.lr: Input should be greater than 0 (got -1)``."""
    lines = []
    for e in err.errors():
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        where = _field_path(e["loc"])
        message = e["msg"].removeprefix("Value error, ")  # a validator's own message names its fields
        lines.append(f"{source}: {message}{got}" if where == "<root>" else f"{source}: {where}: {message}{got}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` -> (["train", "lr"], 3e-05); the value is parsed as YAML (numbers, bools,
    null, ``{...}`` / ``[...]``). A value that YAML reads as a block mapping or cannot read at all is
    the text as typed: ``index.encoder.query_prefix=query: `` is the prompt ``"query: "``, not a
    mapping ``{query: null}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
    key, _, raw = text.partition("=")
    keys = key.strip().split(".")
    if not raw.strip():
        return keys, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return keys, raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw  # "query: " or "- x": only an explicit {...} / [...] is a collection
    return keys, value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RaggenConfig:
    """Read YAML (or defaults when ``path`` is None), apply ``a.b=value`` overrides, validate."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a folder, expected a YAML config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}:{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
    try:
        return RaggenConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def _absolute(path: str | None, must_exist: bool) -> str | None:
    if not path or "://" in path or os.path.isabs(path):
        return path
    if must_exist and not os.path.exists(path):
        return path  # a hub id such as facebook/bart-large
    return os.path.abspath(path)


def absolute_if_local(name_or_path: str) -> str:
    """``name_or_path`` made absolute when it is a relative path that exists here; a hub id, an
    s3:// URI or an absolute path as it is. For paths that are recorded (a manifest's encoder) or
    read in other working dirs (Ray workers)."""
    return _absolute(name_or_path, True)


def with_absolute_paths(cfg: RaggenConfig) -> RaggenConfig:
    """Relative local paths made absolute against the caller's cwd.

    Ray Train workers and Serve replicas run in other working directories, so a path such as
    ``raggen/assets/reader`` must be resolved where the user typed it. Model fields stay as they
    are unless a local folder of that name exists (otherwise they are hub ids).
    """
    c = cfg.model_copy(deep=True)
    c.world.out_dir = _absolute(c.world.out_dir, False)
    c.index.passages, c.index.output = _absolute(c.index.passages, False), _absolute(c.index.output, False)
    c.index.chunk_dir = _absolute(c.index.chunk_dir, False)
    c.index.encoder = c.index.encoder.model_copy(update={"name_or_path": _absolute(c.index.encoder.name_or_path, True)})
    m = c.model  # frozen (the library's ModelSpec): replaced, not edited
    encoders = {
        name: enc.model_copy(update={"name_or_path": _absolute(enc.name_or_path, True)})
        for name in ("query_encoder", "posterior_encoder")
        if (enc := getattr(m, name)) is not None
    }
    c.model = m.model_copy(
        update={**encoders, "generator": _absolute(m.generator, True), "reranker": _absolute(m.reranker, True)}
    )
    t = c.train
    t.storage_path, t.index = _absolute(t.storage_path, False), _absolute(t.index, False)
    t.train_file, t.dev_file = _absolute(t.train_file, False), _absolute(t.dev_file, False)
    c.serve.index, c.serve.model_dir = _absolute(c.serve.index, False), _absolute(c.serve.model_dir, True)
    return c
