"""The model settings (``EncoderSpec``, ``PassageEncoderSpec``, ``ModelSpec``): plain pydantic, no torch.

They travel inside Ray task arguments, the Train loop config and Serve app args; a process that
unpickles one (a tokenise task, the Train controller, the HTTP replica) imports only this module,
not torch and the model code (seconds of start-up and hundreds of MB per process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raggen.models.loading import MINILM_ID

if TYPE_CHECKING:
    from raggen.models.retriever import TextEncoder

Pooling = Literal["cls", "mean", "pooler"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler")

#: How a passage's title and text reach the passage encoder. ``pair``: the tokenizer's sentence
#: pair ``[CLS] title [SEP] text [SEP]``, as DPR's context encoder was trained (and HF's RAG
#: indexes); ``joined``: one string ``title . text`` (sentence-transformers models).
PassageFormat = Literal["pair", "joined"]
PASSAGE_FORMATS: tuple[str, ...] = ("pair", "joined")


class EncoderSpec(BaseModel):
    """Which bi-encoder and how it turns text into one vector: the one definition that the config's
    ``index.encoder`` / ``model.query_encoder`` sections, Serve's app args and the training loop share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name_or_path: str = Field(MINILM_ID, description="HF id, local folder or s3:// folder of the encoder")
    pooling: Pooling = Field("mean", description="cls | mean | pooler (DPR checkpoints: cls = their pooler_output)")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per text; longer texts are truncated")
    normalize: bool = Field(False, description="L2-normalise vectors (cosine); MiniLM was trained so, DPR was not")
    passage_format: PassageFormat | None = Field(
        None, description="pair: (title, text) as a sentence pair (DPR); joined: 'title . text'; null: the model's own"
    )
    query_prefix: str | None = Field(
        None,
        description="text put before every question (E5: 'query: '; BGE v1.5: its search instruction); "
        "null: the one the searched index's manifest records (its index.encoder.query_prefix), else none",
    )
    passage_prefix: str = Field("", description="text put before every passage's encoder input (E5: 'passage: ')")

    def load(self, device: Any = None, dtype: Any = None, name_or_path: str | None = None) -> TextEncoder:
        """The encoder this spec names (or ``name_or_path``, e.g. a downloaded copy of it); ``device``
        and ``dtype`` are torch's."""
        from raggen.models.retriever import TextEncoder

        return TextEncoder.from_pretrained(
            name_or_path or self.name_or_path,
            pooling=self.pooling,
            max_length=self.max_length,
            device=device,
            dtype=dtype,
            normalize=self.normalize,
            passage_format=self.passage_format,
            query_prefix=self.query_prefix,
            passage_prefix=self.passage_prefix,
        )


class ModelSpec(BaseModel):
    """The models a RAG system is made of (the config's ``model`` section is this class); every path
    is an HF id, a local folder or an ``s3://`` folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query_encoder: EncoderSpec = EncoderSpec()
    posterior_encoder: EncoderSpec | None = Field(None, description="q(z|x,y); unset: a copy of the query encoder")
    generator: str = Field("artifacts/models/reader", description="the reader (BART, T5 or decoder-only)")
    reranker: str | None = Field(None, description="gumbel-rerank's cross-encoder")
    max_source_length: int = Field(192, ge=8, description="reader input tokens (question + passage)")
    max_target_length: int = Field(24, ge=1, description="answer tokens")


class PassageEncoderSpec(EncoderSpec):
    """d(z) when training updates it: the searched index's encoder (a hub id, a folder or a refreshed
    run's ``s3://`` snapshot, read with ``s3``)."""

    s3: dict[str, Any] | None = None
