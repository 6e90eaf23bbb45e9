"""``raggen index build`` / ``raggen index refresh`` / ``jobs/refresh.py``: the config's index section
turned into a published index (application layer: the one place these commands read the config).

Build: a document corpus (``index.input: documents``, or a .md/.txt file or folder) is first cut
into passages (``raggen.corpus.documents.prepare_documents``); then ``raggen.index.build_index``
encodes with Ray Data, builds the FAISS shards, publishes a new version and moves LATEST.

Refresh: the same pipeline over the configured corpus (``index.passages``) with another passage
encoder, published as a new version of ``index.output``; a service watching LATEST
(``serve.watch_latest``) switches to it. The encoder is any id or model folder (local or s3://), or
a training checkpoint (a folder or ``s3://.../final`` with ``train_state.json``), from which:

* ``passage_encoder/`` when the checkpoint has one (a run with ``train.train_passage_encoder``);
* else ``query_encoder/`` for a *shared-encoder* run, one whose ``index.encoder`` and
  ``model.query_encoder`` name the same model (the checkpoint's ``config.yaml``, else the current
  config, says so): the trained query encoder is then the run's only trained copy of that encoder
  (the quickstart is such a run: MiniLM on both sides);
* otherwise a ConfigError: the run kept the passage encoder frozen and trained a different query
  encoder, so the index already holds the right passage vectors (``--encoder-role query`` forces
  the query encoder anyway).

Pooling, max_length, normalisation and passage format stay those of ``index.encoder``. The encoder
is fetched from S3 where needed (the encoder actors do it; the manifest names the ``s3://`` folder).
A refresh is resumable: ``build_index``'s default work dir is derived from the corpus content, the
encoder's files and the settings, so rerunning a killed refresh re-encodes only unfinished shards
(``work_dir`` pins it, e.g. on a volume that outlives the pod). Publishing is atomic and LATEST moves
last, so a service reading the same root never sees a half-published version.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from raggen.errors import ConfigError

if TYPE_CHECKING:
    from raggen.index.build_settings import IndexBuildSettings
    from raggen.index.manifest import Manifest
    from raggen.models.specs import EncoderSpec

log = logging.getLogger(__name__)

EncoderRole = Literal["auto", "passage", "query"]


# --------------------------------------------------------------------------- build


def corpus_passages(index) -> tuple[str, str]:
    """(passages URI, passages format) that ``build_index`` encodes for the config's ``index``
    section: ``index.passages`` as it is, or, for documents, their chunked parquet file."""
    from raggen.corpus.documents import is_document_corpus, prepare_documents

    s3 = index.s3.storage_options()
    # auto-detection looks into local paths only: probing an s3:// corpus would need credentials
    # (and a listing) before anything else runs; an S3 document folder says index.input: documents
    local = "://" not in index.passages
    documents = index.input == "documents" or (local and is_document_corpus(index.passages, s3))
    if not documents:
        return index.passages, index.format
    if index.input != "documents":
        log.info("%s holds .md/.txt documents: cutting them into passages (index.input: documents)", index.passages)
    return prepare_documents(index.passages, index.document_settings(), s3), "parquet"


def index_build_settings(index) -> IndexBuildSettings:
    """The ``IndexBuildSettings`` part of the config's ``index`` section (which inherits the class)."""
    from raggen.index.build_settings import IndexBuildSettings
    from raggen.settings_util import section_part

    return section_part(index, IndexBuildSettings)


def _preflight(index, encoder: EncoderSpec, version: str | None, work_dir) -> None:
    """A bad factory, an existing version or an unreachable store fails before any chunking or encoding."""
    from raggen.index.build import preflight_build
    from raggen.index.work_dir import encoder_dim

    s3 = index.s3.storage_options()
    preflight_build(index.output, version, faiss_factory=index.faiss_factory, metric=index.metric,
                    dim=encoder_dim(encoder.name_or_path, s3), s3_options=s3, work_dir=work_dir)  # fmt: skip


def build_index_from_config(
    cfg,
    *,
    address: str | None = None,
    encoder: EncoderSpec | None = None,
    passages_uri: str | None = None,
    **call: Any,
) -> Manifest:
    """``raggen.index.build_index`` over the config's ``index`` section: its corpus (documents
    chunked first, after a preflight), output root, ``index.encoder``, build settings and search
    settings. ``encoder`` replaces ``index.encoder`` (a refresh); ``passages_uri`` replaces the
    corpus (read as ``index.format``, never chunked); ``call``: ``build_index``'s per-call keyword
    arguments (``version``, default ``index.version``; ``work_dir``, ``split_uri``, ``move_latest`` ...)."""
    from raggen.index import build_index
    from raggen.models.sentence_transformers_setup import warn_on_setup_mismatch
    from raggen.ray_utils import ensure_ray

    index = cfg.index
    encoder = encoder if encoder is not None else index.encoder
    call.setdefault("version", index.version)
    _preflight(index, encoder, call["version"], call.get("work_dir"))
    warn_on_setup_mismatch("index.encoder", encoder, index.s3.storage_options())  # before 21M passages are encoded
    passages = (passages_uri, index.format) if passages_uri is not None else corpus_passages(index)
    ensure_ray(address=address)
    return build_index(
        passages[0],
        index.output,
        encoder=encoder,
        settings=index_build_settings(index),
        search=index.search,
        passages_format=passages[1],
        s3_options=index.s3.storage_options(),
        **call,
    )


# --------------------------------------------------------------------------- refresh


@dataclass(frozen=True)
class RefreshEncoder:
    """The passage encoder a refresh uses: ``name_or_path`` (what the manifest records) and where it
    came from (``checkpoint`` and ``role`` when picked out of a training checkpoint)."""

    name_or_path: str
    checkpoint: str | None = None
    role: str | None = None  # passage_encoder | query_encoder


def _join(base: str, name: str) -> str:
    from raggen.storage import is_s3_uri, join_uri

    return join_uri(base, name) if is_s3_uri(base) else str(Path(os.path.expanduser(base)) / name)


def read_checkpoint_state(checkpoint: str, s3_options=None) -> dict | None:
    """A checkpoint's ``train_state.json`` (local folder or s3://), or None when ``checkpoint`` is
    not a training checkpoint (a model folder, a hub id)."""
    import json

    from raggen.models.exports import resolve_export
    from raggen.storage import is_s3_uri, read_bytes
    from raggen.train.checkpointing import STATE_FILE

    checkpoint = resolve_export(
        checkpoint, s3_options, verify=False
    )  # a model export: LATEST's (models verified on load)
    path = _join(checkpoint, STATE_FILE)
    if not is_s3_uri(checkpoint) and not os.path.isfile(path):
        return None
    try:
        data = read_bytes(path, s3_options)
    except FileNotFoundError:  # raggen.storage maps a missing S3 key to it too
        return None
    try:
        state = json.loads(data)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg})") from None
    return state if isinstance(state, dict) else None


def _checkpoint_config(checkpoint: str, s3_options=None) -> dict | None:
    from raggen.storage import exists, read_bytes
    from raggen.train.checkpointing import CONFIG_FILE

    path = _join(checkpoint, CONFIG_FILE)
    if not exists(path, s3_options):
        return None
    data = yaml.safe_load(read_bytes(path, s3_options))
    return data if isinstance(data, dict) else None


def _shared_encoder(run_config: dict | None, cfg) -> bool:
    """Did the run use one encoder model for passages and queries (index.encoder == model.query_encoder)?"""
    if run_config is not None:
        index_enc = ((run_config.get("index") or {}).get("encoder") or {}).get("name_or_path")
        query_enc = ((run_config.get("model") or {}).get("query_encoder") or {}).get("name_or_path")
        if index_enc and query_enc:
            return index_enc == query_enc
    return cfg.index.encoder.name_or_path == cfg.model.query_encoder.name_or_path


def resolve_refresh_encoder(encoder: str, cfg, *, role: EncoderRole = "auto", s3_options=None) -> RefreshEncoder:
    """The passage encoder named by ``encoder``: a checkpoint's ``passage_encoder/`` or (shared
    encoder, or ``role="query"``) ``query_encoder/``; anything else (an id, a model folder) as it is."""
    if role not in ("auto", "passage", "query"):
        raise ConfigError(f"--encoder-role: expected auto, passage or query, got {role!r}")
    from raggen.config import absolute_if_local
    from raggen.models.exports import resolve_export

    # the manifest records it: a cwd-relative path would not load from another folder (or a Serve replica)
    encoder = absolute_if_local(encoder)
    # a model export (runs/NAME/final): the export LATEST names now, so the index records that exact export
    encoder = resolve_export(encoder, s3_options, verify=False)
    state = read_checkpoint_state(encoder, s3_options)
    if state is None:
        if role != "auto":
            raise ConfigError(f"--encoder-role {role}: {encoder} is not a training checkpoint (no train_state.json)")
        return RefreshEncoder(name_or_path=encoder)
    models = set(state.get("models") or [])
    if role == "auto":
        if "passage_encoder" in models:
            role = "passage"
        elif "query_encoder" in models and _shared_encoder(_checkpoint_config(encoder, s3_options), cfg):
            role = "query"
            log.info(
                "%s: a shared-encoder run (no passage_encoder/): passages are encoded with its query_encoder/", encoder
            )
        else:
            raise ConfigError(
                f"--encoder {encoder}: the checkpoint has no passage_encoder/ (the run kept the passage encoder "
                "frozen, so the index already holds its vectors) and its query encoder is not the index's encoder; "
                "pass --encoder-role query to encode passages with its query_encoder/ anyway"
            )
    name = f"{role}_encoder"
    if name not in models:
        raise ConfigError(f"--encoder {encoder}: the checkpoint has no {name}/ (it holds {sorted(models)})")
    return RefreshEncoder(name_or_path=_join(encoder, name), checkpoint=encoder, role=name)


def refresh_index_from_config(
    cfg,
    encoder: str,
    *,
    role: EncoderRole = "auto",
    version: str | None = None,
    work_dir: str | None = None,
    split_uri: str | None = None,
    address: str | None = None,
):
    """Re-encode ``index.passages`` with ``encoder`` and publish a new version of ``index.output``
    (LATEST moves to it). ``version`` names it (default: a fresh name; ``index.version``, the name of
    the first build, is not reused). Returns (manifest, RefreshEncoder)."""
    s3 = cfg.index.s3.storage_options()
    picked = resolve_refresh_encoder(encoder, cfg, role=role, s3_options=s3)
    log.info("refresh %s with encoder %s", cfg.index.output, picked.name_or_path)
    manifest = build_index_from_config(
        cfg,
        address=address,
        encoder=cfg.index.encoder.model_copy(update={"name_or_path": picked.name_or_path}),
        version=version,
        work_dir=work_dir,
        split_uri=split_uri,
    )
    return manifest, picked
