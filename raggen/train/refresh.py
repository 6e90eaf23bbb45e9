"""Scheduled index refresh: re-encode the corpus with the passage encoder being trained.

With ``train.train_passage_encoder`` the step scores candidates with a freshly computed d(z), but
the index that *chooses* the candidates still holds the vectors of the encoder the run started
with. Every ``refresh_index_every`` steps rank 0 saves the current passage encoder, runs the
ordinary index pipeline (``raggen.index.build_index``: Ray Data encoding, FAISS shards, manifest,
checksums) into the run's own index root, and every worker opens the new version before the next
step (a synchronous version of REALM's asynchronous refresh). The index the run started from is
never touched; each checkpoint records which refreshed version the run was searching, so a
resumed run searches the same one.

The encoder snapshot is written to ``staging_dir`` and, when the run stores to S3, uploaded under
``snapshot_uri`` so that encoder actors on any node download it (with local storage the run folder
must be shared storage on a multi-node cluster); the refreshed manifest names that snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raggen.index.build_settings import IndexBuildSettings
from raggen.index.settings import SearchSettings
from raggen.models.specs import EncoderSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class RefreshSpec:
    """Where the refreshed index goes and how ``raggen.index.build_index`` builds it (its settings
    objects; the encoder's ``name_or_path`` is replaced by each snapshot)."""

    every: int
    passages_uri: str
    output_uri: str  # the run's own index root, e.g. runs/<name>/index
    staging_dir: str  # passage-encoder snapshots, readable by the encoder actors
    encoder: EncoderSpec  # pooling, max_length, normalisation and passage format of the refreshed d(z)
    settings: IndexBuildSettings = IndexBuildSettings()
    search: SearchSettings | None = None  # its build-time tuning (target_recall ...); None: SearchSettings()
    passages_format: str = "auto"
    s3: dict[str, Any] | None = None
    snapshot_uri: str | None = None  # s3:// prefix for the encoder snapshots (None: use staging_dir)


def refresh_due(step: int, every: int, total_steps: int) -> bool:
    """After step ``step`` (1-based): every ``every`` steps, but not after the last one (nothing
    would search that index)."""
    return every > 0 and step % every == 0 and step < total_steps


def version_for_step(step: int) -> str:
    """Unique per attempt: a run restarted after a failure may refresh at the same step again,
    and published versions are immutable."""
    return f"step-{step:07d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"


def build_refreshed_index(passage_encoder: torch.nn.Module, spec: RefreshSpec, step: int) -> str:
    """Rank 0's part: snapshot the encoder, run the index pipeline, return the published version."""
    from raggen.index import build_index

    name = f"passage-encoder-step-{step:07d}"
    snapshot = os.path.join(spec.staging_dir, name)
    passage_encoder.save_pretrained(snapshot)
    if spec.snapshot_uri:
        from raggen.storage import join_uri, upload_dir

        snapshot = join_uri(spec.snapshot_uri, name)
        upload_dir(os.path.join(spec.staging_dir, name), snapshot, spec.s3)
    version = version_for_step(step)
    # a work folder of its own: build_index resumes encoding from a matching one, and a retried
    # attempt's encoder need not equal the failed attempt's
    manifest = build_index(
        spec.passages_uri,
        spec.output_uri,
        encoder=spec.encoder.model_copy(update={"name_or_path": snapshot}),
        settings=spec.settings,
        search=spec.search,
        passages_format=spec.passages_format,
        version=version,
        work_dir=os.path.join(spec.staging_dir, f"work-{version}"),
        s3_options=spec.s3,
    )
    return manifest.version


def agree_on_version(build, rank: int) -> str:
    """Rank 0 runs ``build()``; every worker gets its version, or every worker raises its error
    (a failed build must not leave the other ranks waiting in the broadcast)."""
    outcome: tuple[str, str] | None = None
    if rank == 0:
        try:
            outcome = ("ok", build())
        except Exception as exc:  # re-raised on every rank below
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    import torch  # here, not at import: the Train controller unpickles RefreshSpec and needs no torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [outcome]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = box[0]
    status, value = outcome
    if status != "ok":
        raise RuntimeError(f"index refresh failed on rank 0: {value}")
    return value
