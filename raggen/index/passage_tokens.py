"""Stage 2a of the encode pipeline: passages -> fixed-width token columns, in plain CPU tasks, so
the encoder actor (the GPU) only runs the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from raggen.storage import is_s3_uri, open_store

#: the token columns the tokenise stage emits (those the tokenizer makes), each (b, max_length) int32
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
NUM_TOKENS = "num_tokens"  # (b,) int32: real tokens per row, what the actor buckets by
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf")


def load_passage_tokenizer(name_or_path: str, s3_options: Mapping[str, Any] | None = None):
    """The encoder's tokenizer alone, loaded once on the driver and shipped to the tokenise tasks
    (so no task downloads a model); of an ``s3://`` folder only the small non-weight files are fetched."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from raggen.models.loading import resolve_model_path

    if not is_s3_uri(name_or_path):
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    store = open_store(name_or_path, s3_options)
    tmp = tempfile.mkdtemp(prefix="raggen-tokenizer-")
    try:
        for name in store.list():
            if not name.lower().endswith(_WEIGHT_SUFFIXES):
                store.download_file(name, Path(tmp, name))
        return AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pad_to_width(x: np.ndarray, width: int, value: int, side: str) -> np.ndarray:
    """(b, t) -> (b, width) int32, padded on the tokenizer's padding side."""
    out = np.full((x.shape[0], width), value, dtype=np.int32)
    if side == "left":
        out[:, width - x.shape[1] :] = x
    else:
        out[:, : x.shape[1]] = x
    return out


def tokenize_batch(
    batch: dict[str, np.ndarray], *, tokenizer, passage_format: str, max_length: int, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Stage 2a: title/text -> fixed-width token columns (b, max_length) int32 + ``num_tokens`` (b,).

    A pure function of the tokenizer, run as plain CPU tasks, so the encoder actor (the GPU) only
    runs the model. Fixed width keeps every block's columns one shape; the actor trims the padding.
    """
    from raggen.models.passage_input import tokenize_passages

    titles, texts = [str(t) for t in batch["title"]], [str(t) for t in batch["text"]]
    out = dict(batch)
    if not texts:
        names = [c for c in TOKEN_COLUMNS if c != "token_type_ids" or c in tokenizer.model_input_names]
        out.update({c: np.zeros((0, max_length), np.int32) for c in names})
        out[NUM_TOKENS] = np.zeros(0, np.int32)
        return out
    enc = tokenize_passages(
        tokenizer, titles, texts, passage_format=passage_format, max_length=max_length, return_tensors="np",
        prefix=prefix,
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name in TOKEN_COLUMNS:
        if name in enc:
            value = pad_id if name == "input_ids" else 0
            out[name] = _pad_to_width(np.asarray(enc[name]), max_length, value, tokenizer.padding_side)
    out[NUM_TOKENS] = out["attention_mask"].sum(axis=1, dtype=np.int32)
    return out
