"""Bi-encoder text encoders: one HF encoder + pooling -> one vector per text, scored by inner product."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from raggen.errors import ConfigError
from raggen.models.loading import declared_architecture, load_pretrained_strict, resolve_model_path
from raggen.models.passage_input import passage_text, tokenize_passages
from raggen.models.specs import PASSAGE_FORMATS, POOLINGS, EncoderSpec, PassageFormat, Pooling

__all__ = [  # the settings and tokenisation live in torch-free modules; re-exported for callers
    "EncoderSpec", "PassageFormat", "Pooling", "PASSAGE_FORMATS", "POOLINGS", "passage_text", "tokenize_passages",
    "TextEncoder", "BiEncoder", "pool", "save_pretrained_atomic", "inner_product_scores", "default_passage_format",
]  # fmt: skip


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(n, t, h), (n, t) -> (n, h). DPR uses CLS; sentence-transformers models use the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (n, t, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"pool() takes 'cls' or 'mean', got {pooling!r}")


def save_pretrained_atomic(path: str, *parts) -> None:
    """``save_pretrained`` every part (model, tokenizer) into a temp folder, then swap it in.

    A crash mid-save leaves the previous folder (or nothing), never a half-written model.
    """
    target = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        for part in parts:
            part.save_pretrained(tmp)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


DPR_ARCHITECTURES = ("DPRContextEncoder", "DPRQuestionEncoder", "DPRReader")


def default_passage_format(model: nn.Module) -> PassageFormat:
    """``pair`` for DPR checkpoints (their training format), ``joined`` for everything else."""
    return "pair" if getattr(model.config, "model_type", None) == "dpr" else "joined"


def _encoder_class(path: str):
    """The class to load an encoder checkpoint as: a DPR encoder as the DPR class its config declares
    (``AutoModel`` maps every ``dpr`` checkpoint to ``DPRQuestionEncoder``, which would read a context
    encoder's weights as missing), anything else as its base model through ``AutoModel``."""
    import transformers

    arch = declared_architecture(path)
    if arch in DPR_ARCHITECTURES and arch != "DPRReader":
        return getattr(transformers, arch)
    if arch == "DPRReader":
        raise ValueError(
            f"{path}: a DPRReader is a span reader, not a bi-encoder; use a DPR context or question encoder"
        )
    return AutoModel


class TextEncoder(nn.Module):
    """An HF encoder with its tokenizer; ``forward(texts) -> (n, dim)`` keeps the graph for training.

    Pooling: ``cls`` (the first token's state), ``mean`` (masked mean, sentence-transformers) or
    ``pooler`` (the model's own ``pooler_output``). DPR encoders define their vector as the
    ``pooler_output`` (the CLS state, or its projection when ``projection_dim > 0``), so for them
    ``cls`` and ``pooler`` both give it; ``mean`` is refused. ``normalize=True`` L2-normalises the
    pooled vectors, as sentence-transformers' MiniLM was trained (inner product = cosine); DPR
    encoders are used unnormalised. ``passage_format`` says how passages are tokenised (see
    :data:`PassageFormat`; None = the model's own, :func:`default_passage_format`).
    ``query_prefix`` / ``passage_prefix``: a model's prompts (E5's ``query: `` / ``passage: ``), put
    before every query (any text given without titles) and every passage. ``query_prefix=None``:
    none of its own; a search uses the index's (:meth:`query_prefix_for`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling: Pooling = "mean",
        max_length: int = 256,
        normalize: bool = False,
        passage_format: PassageFormat | None = None,
        query_prefix: str | None = None,
        passage_prefix: str = "",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.is_dpr = getattr(model.config, "model_type", None) == "dpr"
        if self.is_dpr and pooling == "mean":
            raise ValueError(
                "pooling 'mean' does not apply to a DPR encoder: its vector is the pooler_output (use 'cls')"
            )
        passage_format = passage_format or default_passage_format(model)
        if passage_format not in PASSAGE_FORMATS:
            raise ValueError(f"passage_format must be one of {PASSAGE_FORMATS}, got {passage_format!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.max_length = max_length
        self.normalize = normalize
        self.passage_format: PassageFormat = passage_format
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix or ""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooling: Pooling = "mean",
        max_length: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalize: bool = False,
        passage_format: PassageFormat | None = None,
        query_prefix: str | None = None,
        passage_prefix: str = "",
    ) -> TextEncoder:
        """Loads the class the checkpoint declares; a weight the checkpoint lacks is a ConfigError."""
        path = resolve_model_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model_class = _encoder_class(path)
        except OSError as exc:
            raise ConfigError(f"encoder {name_or_path!r}: cannot load ({str(exc).splitlines()[0]})") from exc
        kwargs = {"dtype": dtype} if dtype else {}
        model = load_pretrained_strict("encoder", model_class, path, name_or_path, **kwargs)
        encoder = cls(
            model, tokenizer, pooling=pooling, max_length=max_length, normalize=normalize, passage_format=passage_format,
            query_prefix=query_prefix, passage_prefix=passage_prefix,
        )  # fmt: skip
        return encoder.to(device) if device is not None else encoder

    @property
    def dim(self) -> int:
        projection = int(getattr(self.model.config, "projection_dim", 0) or 0) if self.is_dpr else 0
        return projection or int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_device(self, batch) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def query_prefix_for(self, index_prefix: str) -> str:
        """The prefix of queries searching an index whose manifest records ``index_prefix``: this
        encoder's own when it has one (a configured ``query_prefix``), else the index's."""
        return self.query_prefix if self.query_prefix is not None else index_prefix

    def tokenize(self, texts: list[str], device: bool = True, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """Queries (or any single texts, each after ``prefix``, default :attr:`query_prefix`) ->
        padded tensors; ``device=False`` keeps them on the CPU (tokenising in another process than
        the one that runs the model)."""
        prefix = (self.query_prefix or "") if prefix is None else prefix
        batch = self.tokenizer(
            [prefix + t for t in texts], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return self._to_device(batch) if device else dict(batch)

    def tokenize_passages(self, titles: list[str], texts: list[str], device: bool = True) -> dict[str, torch.Tensor]:
        """Passages in this encoder's :attr:`passage_format` (see :func:`tokenize_passages`)."""
        batch = tokenize_passages(
            self.tokenizer, titles, texts, passage_format=self.passage_format, max_length=self.max_length,
            prefix=self.passage_prefix,
        )  # fmt: skip
        return self._to_device(batch) if device else batch

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised inputs (n, t) -> pooled (and maybe normalised) vectors (n, dim), with grad."""
        batch = self._to_device(batch)
        if self.is_dpr:
            vectors = self.model(**batch).pooler_output  # (n, dim): CLS, or its projection
        else:
            out = self.model(**batch)
            if self.pooling == "pooler":
                if getattr(out, "pooler_output", None) is None:
                    raise ValueError(f"pooling 'pooler': {type(self.model).__name__} has no pooler_output")
                vectors = out.pooler_output
            else:
                vectors = pool(out.last_hidden_state, batch["attention_mask"], self.pooling)  # (n, h)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def forward(self, texts: list[str], titles: list[str] | None = None) -> torch.Tensor:
        """Queries (``titles=None``) or passages (their titles given) -> (n, dim) with grad.

        One entry point for both, so a DDP-wrapped passage encoder still goes through ``forward``.
        """
        if titles is None:
            return self.embed(self.tokenize(texts))
        return self.embed(self.tokenize_passages(titles, texts))

    def forward_passages(self, titles: list[str], texts: list[str]) -> torch.Tensor:
        """Passages -> (n, dim) with grad (a trained passage encoder)."""
        return self(texts, titles=titles)

    @torch.no_grad()
    def _inference(self, embed_rows, n: int, batch_size: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = [embed_rows(i, min(n, i + batch_size)).float().cpu() for i in range(0, n, batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def encode(self, texts: list[str], batch_size: int = 64, prefix: str | None = None) -> torch.Tensor:
        """Inference helper for queries: (n, dim) float32 on CPU, in batches, no graph; ``prefix``
        as :meth:`tokenize`'s (a search passes :meth:`query_prefix_for` its index's)."""
        return self._inference(
            lambda i, j: self.embed(self.tokenize(texts[i:j], prefix=prefix)), len(texts), batch_size
        )

    def encode_passages(self, titles: list[str], texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Inference helper for passages: (n, dim) float32 on CPU, in this encoder's passage format."""
        return self._inference(lambda i, j: self.forward_passages(titles[i:j], texts[i:j]), len(texts), batch_size)

    def save_pretrained(self, path: str) -> None:
        save_pretrained_atomic(path, self.model, self.tokenizer)


def inner_product_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(b, d), (b, k, d) -> (b, k): the retriever score <q_b, d_bk> of each candidate."""
    if queries.dim() != 2 or passages.dim() != 3 or passages.shape[0] != queries.shape[0]:
        raise ValueError(
            f"expected queries (b, d) and passages (b, k, d), got {tuple(queries.shape)} and {tuple(passages.shape)}"
        )
    if passages.shape[-1] != queries.shape[-1]:
        raise ValueError(f"dims differ: queries {queries.shape[-1]}, passages {passages.shape[-1]}")
    return torch.einsum("bd,bkd->bk", queries, passages)


class BiEncoder(nn.Module):
    """A query encoder and a passage encoder scored by inner product (DPR).

    The passage encoder is frozen in most recipes (the index holds its vectors); pass the same
    TextEncoder twice to share weights.
    """

    def __init__(self, query_encoder: TextEncoder, passage_encoder: TextEncoder):
        super().__init__()
        if query_encoder.dim != passage_encoder.dim:
            raise ValueError(f"query dim {query_encoder.dim} != passage dim {passage_encoder.dim}")
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder

    @classmethod
    def from_pretrained(
        cls,
        query_name_or_path: str,
        passage_name_or_path: str | None = None,
        pooling: Pooling = "mean",
        max_length: int = 256,
        normalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BiEncoder:
        """``passage_name_or_path=None`` shares one encoder for both sides."""
        kwargs = dict(pooling=pooling, max_length=max_length, normalize=normalize, device=device, dtype=dtype)
        query = TextEncoder.from_pretrained(query_name_or_path, **kwargs)
        passage = query if passage_name_or_path is None else TextEncoder.from_pretrained(passage_name_or_path, **kwargs)
        return cls(query, passage)

    @property
    def dim(self) -> int:
        return self.query_encoder.dim

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """(n, d) with grad."""
        return self.query_encoder(texts)

    def encode_passages(self, texts: list[str]) -> torch.Tensor:
        """(n, d) with grad (wrap in no_grad when the passage side is frozen)."""
        return self.passage_encoder(texts)

    @staticmethod
    def score(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """(b, d), (b, k, d) -> (b, k) inner products."""
        return inner_product_scores(queries, passages)

    def forward(self, questions: list[str], passages: list[list[str]]) -> torch.Tensor:
        """Scores (b, k) of each question against its own k passages, both sides with grad."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
        k = len(passages[0]) if passages else 0
        for row, group in enumerate(passages):
            if len(group) != k:
                raise ValueError(f"passages[{row}] has {len(group)} passages, passages[0] has {k}")
        q = self.encode_queries(questions)  # (b, d)
        d = self.encode_passages([p for group in passages for p in group]).view(len(passages), k, -1)  # (b, k, d)
        return self.score(q, d)
