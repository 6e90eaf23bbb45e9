"""The models an estimator trains, built from their specs (``ModelSpec``: ``EncoderSpec`` s,
HF ids or folders) or restored from a checkpoint's folders: the one place that knows which roles
each estimator needs. Train workers, ``raggen eval`` and the benchmarks call it."""

from __future__ import annotations

from typing import Any

from torch import nn

from raggen.errors import ConfigError
from raggen.models.specs import EncoderSpec, ModelSpec, PassageEncoderSpec

# the specs are re-exported (torch-free module)
__all__ = ["ModelSpec", "PassageEncoderSpec", "build_models", "use_index_prompts"]


def build_models(
    spec: ModelSpec,
    estimator: str,
    restored: dict[str, str] | None = None,
    passage_encoder: PassageEncoderSpec | None = None,
) -> dict[str, nn.Module]:
    """The models an estimator needs, each from its checkpoint folder when restored, else from the
    configured id/path; the trained passage encoder only when ``passage_encoder`` is given. Built on
    CPU in float32 (autocast handles bf16 on GPU)."""
    from raggen.models import Generator, PosteriorRetriever, Reranker

    restored = restored or {}
    qspec = spec.query_encoder
    models: dict[str, nn.Module] = {}
    models["query_encoder"] = qspec.load(name_or_path=restored.get("query_encoder"))
    models["generator"] = Generator.from_pretrained(
        restored.get("generator", spec.generator),
        max_source_length=spec.max_source_length,
        max_target_length=spec.max_target_length,
    )
    if estimator in ("vrag", "jsa"):
        pspec = spec.posterior_encoder
        if "posterior_encoder" in restored or pspec is not None:
            source = pspec or qspec
            models["posterior_encoder"] = PosteriorRetriever.from_pretrained(
                restored.get("posterior_encoder", source.name_or_path), **_encoder_kwargs(source)
            )
        else:  # DESIGN: the posterior starts as a copy of the prior query encoder
            models["posterior_encoder"] = PosteriorRetriever.from_query_encoder(models["query_encoder"])
    if passage_encoder is not None:
        from raggen.models.loading import fetch_model_dir

        # the searched index's encoder: a hub id, a folder, or a refreshed run's s3:// snapshot
        source = restored.get("passage_encoder") or fetch_model_dir(passage_encoder.name_or_path, passage_encoder.s3)
        models["passage_encoder"] = passage_encoder.load(name_or_path=source)
    if estimator == "gumbel-rerank":
        path = restored.get("reranker", spec.reranker)
        if not path:
            raise ConfigError("model.reranker: gumbel-rerank needs a reranker (an HF id or folder)")
        models["reranker"] = Reranker.from_pretrained(path)
    return models


def use_index_prompts(models: dict[str, nn.Module], query_prefix: str) -> None:
    """The query-side encoders (prior and posterior) that have no ``query_prefix`` of their own take
    the searched index's: a model's query prompt travels with the index its passages are in."""
    for role in ("query_encoder", "posterior_encoder"):
        encoder = getattr(models.get(role), "encoder", models.get(role))  # a PosteriorRetriever wraps one
        if encoder is not None and encoder.query_prefix is None:
            encoder.query_prefix = query_prefix


def _encoder_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    return {
        "pooling": spec.pooling,
        "max_length": spec.max_length,
        "normalize": spec.normalize,
        "passage_format": spec.passage_format,
        "query_prefix": spec.query_prefix,
        "passage_prefix": spec.passage_prefix,
    }
