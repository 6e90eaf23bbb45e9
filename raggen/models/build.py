"""The models an estimator trains, built from their specs (plain dicts of ``EncoderSpec`` fields,
HF ids or folders) or restored from a checkpoint's folders: the one place that knows which roles
each estimator needs. Train workers, ``raggen eval`` and the benchmarks call it."""

from __future__ import annotations

from typing import Any

from torch import nn

from raggen.errors import ConfigError


def _encoder_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "pooling": spec.get("pooling", "mean"),
        "max_length": int(spec.get("max_length", 128)),
        "normalize": bool(spec.get("normalize", False)),
        "passage_format": spec.get("passage_format"),
    }


def build_models(
    model_cfg: dict[str, Any],
    estimator: str,
    restored: dict[str, str] | None = None,
    train_passage_encoder: bool = False,
) -> dict[str, nn.Module]:
    """The models an estimator needs, each from its checkpoint folder when restored, else from the
    configured id/path. Built on CPU in float32 (autocast handles bf16 on GPU)."""
    from raggen.models import Generator, PosteriorRetriever, Reranker, TextEncoder

    restored = restored or {}
    qspec = model_cfg["query_encoder"]
    models: dict[str, nn.Module] = {}
    models["query_encoder"] = TextEncoder.from_pretrained(
        restored.get("query_encoder", qspec["name_or_path"]), **_encoder_kwargs(qspec)
    )
    models["generator"] = Generator.from_pretrained(
        restored.get("generator", model_cfg["generator"]),
        max_source_length=int(model_cfg.get("max_source_length", 192)),
        max_target_length=int(model_cfg.get("max_target_length", 24)),
    )
    if estimator in ("vrag", "jsa"):
        pspec = model_cfg.get("posterior_encoder")
        if "posterior_encoder" in restored:
            models["posterior_encoder"] = PosteriorRetriever.from_pretrained(
                restored["posterior_encoder"], **_encoder_kwargs(pspec or qspec)
            )
        elif pspec:
            models["posterior_encoder"] = PosteriorRetriever.from_pretrained(
                pspec["name_or_path"], **_encoder_kwargs(pspec)
            )
        else:  # DESIGN: the posterior starts as a copy of the prior query encoder
            models["posterior_encoder"] = PosteriorRetriever.from_query_encoder(models["query_encoder"])
    if train_passage_encoder:
        dspec = model_cfg.get("passage_encoder")
        if not dspec:
            raise ConfigError("train.train_passage_encoder: needs the index's passage encoder (index.encoder)")
        from raggen.models.loading import fetch_model_dir

        # the searched index's encoder: a hub id, a folder, or a refreshed run's s3:// snapshot
        source = restored.get("passage_encoder") or fetch_model_dir(dspec["name_or_path"], dspec.get("s3"))
        models["passage_encoder"] = TextEncoder.from_pretrained(source, **_encoder_kwargs(dspec))
    if estimator == "gumbel-rerank":
        path = restored.get("reranker", model_cfg.get("reranker"))
        if not path:
            raise ConfigError("model.reranker: gumbel-rerank needs a reranker (an HF id or folder)")
        models["reranker"] = Reranker.from_pretrained(path)
    return models
