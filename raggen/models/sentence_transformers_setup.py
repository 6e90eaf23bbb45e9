"""What a sentence-transformers checkpoint says about its own vectors: pooling, normalisation, prompts.

A sentence-transformers folder (``modules.json``, ``1_Pooling/config.json``, a ``Normalize``
module, the ``prompts`` of ``config_sentence_transformers.json``) records how it was trained to
turn text into one vector. raggen's encoder settings (``pooling``, ``normalize``,
``query_prefix``, ``passage_prefix``) default to mean pooling, unnormalised, no prompts; a
BGE-style model (CLS pooling, normalised, a query instruction) or an E5 one (``query: `` /
``passage: ``) left at those defaults encodes differently from how it was trained, with no error.
:func:`setup_mismatch` names the settings a config left at their defaults that the checkpoint
contradicts, so the index build can warn before encoding 21M passages that way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: sentence-transformers' pooling modes -> raggen's pooling (modes raggen lacks map to None)
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
_OTHER_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken")  # fmt: skip
#: the names models give their query and passage prompts in ``config_sentence_transformers.json``
QUERY_PROMPT_NAMES = ("query", "retrieval.query")
PASSAGE_PROMPT_NAMES = ("passage", "document", "retrieval.passage")


def own_prompts(read: Callable[[str], bytes | None]) -> dict[str, str]:
    """{"query_prefix": ..., "passage_prefix": ...} from ``config_sentence_transformers.json``'s
    ``prompts`` (the first of each role's known names; "" when the model has none)."""
    raw = read("config_sentence_transformers.json")
    prompts = (json.loads(raw).get("prompts") or {}) if raw is not None else {}

    def first(names: tuple[str, ...]) -> str:
        return next((str(prompts[n]) for n in names if prompts.get(n)), "")

    return {"query_prefix": first(QUERY_PROMPT_NAMES), "passage_prefix": first(PASSAGE_PROMPT_NAMES)}


def own_setup(read: Callable[[str], bytes | None]) -> dict[str, Any] | None:
    """{"pooling": "cls" | "mean" | "other: <mode>", "normalize": bool, "query_prefix": str,
    "passage_prefix": str} from a checkpoint's files (``read(relative path)``: the bytes, or None
    when absent); None without ``modules.json``."""
    modules_raw = read("modules.json")
    if modules_raw is None:
        return None
    modules = json.loads(modules_raw)
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    setup: dict[str, Any] = {"pooling": None, "normalize": "Normalize" in kinds}
    if "Pooling" in kinds:
        raw = read(os.path.join(kinds["Pooling"].get("path", ""), "config.json"))
        config = json.loads(raw) if raw is not None else {}
        on = [mode for mode in (*_POOLING_MODES, *_OTHER_MODES) if config.get(mode)]
        if len(on) == 1:
            setup["pooling"] = _POOLING_MODES.get(on[0], f"other: {on[0]}")
    return {**setup, **own_prompts(read)}


def setup_mismatch(spec: Any, setup: dict[str, Any] | None) -> list[str]:
    """The settings of ``spec`` (an EncoderSpec) left at raggen's defaults (not set in the config)
    that contradict the checkpoint's own ``setup``, each as "field: raggen's value, the model's"."""
    if setup is None:
        return []
    unset = {"pooling", "normalize", "passage_prefix"} - set(spec.model_fields_set)
    out = []
    if "pooling" in unset and setup["pooling"] is not None and setup["pooling"] != spec.pooling:
        out.append(f"pooling: {spec.pooling} (the model pools {setup['pooling']})")
    if "normalize" in unset and setup["normalize"] != spec.normalize:
        out.append(
            f"normalize: {str(spec.normalize).lower()} (the model {'normalises' if setup['normalize'] else 'does not normalise'})"
        )
    if spec.query_prefix is None and setup.get("query_prefix"):  # None: unset, whatever the fields set says
        out.append(f"query_prefix: none (the model's query prompt is {setup['query_prefix']!r})")
    if "passage_prefix" in unset and setup.get("passage_prefix") and setup["passage_prefix"] != spec.passage_prefix:
        out.append(f"passage_prefix: none (the model's passage prompt is {setup['passage_prefix']!r})")
    return out


def local_reader(folder: str) -> Callable[[str], bytes | None]:
    """``read`` for :func:`own_setup` over a local model folder."""

    def read(rel: str) -> bytes | None:
        path = Path(folder, rel)
        return path.read_bytes() if path.is_file() else None

    return read


def warn_on_setup_mismatch(field: str, spec: Any, s3_options=None) -> list[str]:
    """Log a WARNING naming ``field`` when :func:`setup_mismatch` finds any; returns them. Best effort:
    a checkpoint whose files cannot be read here (a hub id offline) is not checked."""
    from raggen.models.loading import resolve_model_path
    from raggen.storage import is_s3_uri, join_uri, read_bytes

    name = spec.name_or_path
    try:
        if is_s3_uri(name):

            def read(rel: str) -> bytes | None:
                try:
                    return read_bytes(join_uri(name, rel), s3_options)
                except FileNotFoundError:
                    return None

        else:
            path = resolve_model_path(name)
            read = local_reader(path) if os.path.isdir(path) else _hub_reader(path)
        found = setup_mismatch(spec, own_setup(read))
    except Exception as exc:  # noqa: BLE001 - a warning's check must never fail the build
        log.debug("%s: no sentence-transformers check of %s (%s)", field, name, exc)
        return []
    if found:
        log.warning(
            "%s: %s is a sentence-transformers model; this config leaves %s at raggen's default, which "
            "differs from how the model was trained: %s. Set them in %s (the index records them)",
            field, name, " and ".join(m.split(":")[0] for m in found), "; ".join(found), field,
        )  # fmt: skip
    return found


def _hub_reader(repo: str) -> Callable[[str], bytes | None]:
    def read(rel: str) -> bytes | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(repo, rel)).read_bytes()
        except EntryNotFoundError:
            return None

    return read
