"""One training step of every estimator on tiny models, on CPU, without Ray: the loss is finite,
its gradient reaches every model the estimator trains (``trainable_roles``) and none it keeps
fixed, and one optimiser step on a fixed batch lowers the loss. Seconds, not a Ray Train run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from raggen.models import make_tiny_encoder, make_tiny_generator, make_tiny_reranker, passage_text
from raggen.models.build import ModelSpec, build_models
from raggen.models.retriever import EncoderSpec
from raggen.names import ESTIMATORS
from raggen.train.settings import GumbelSettings, JSASettings, StepSettings
from raggen.train.step import Batch, StepModels, run_step, trainable_roles

TITLES = [f"Town {i}" for i in range(12)]
TEXTS = [f"Town {i} lies by the river {chr(97 + i)} and its mayor is Ann {i}." for i in range(12)]
ROWS = [{"id": "q0", "question": "Who is the mayor of Town 3?", "answers": ["Ann 3"]},
        {"id": "q1", "question": "Which river is Town 7 by?", "answers": ["the river h"]}]  # fmt: skip


@dataclass
class Hits:
    ids: list[list[str]]
    titles: list[list[str]]
    texts: list[list[str]]
    embeddings: np.ndarray


class ExactIndex:
    """Exact inner-product search over fixed vectors: what a FAISS Flat shard returns, in memory."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, xq: np.ndarray, k: int, **_) -> Hits:
        top = np.argsort(-(xq @ self.vectors.T), axis=1, kind="stable")[:, :k]
        return Hits([[f"p{j}" for j in row] for row in top], [[TITLES[j] for j in row] for row in top],
                    [[TEXTS[j] for j in row] for row in top], self.vectors[top])  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("step-models")
    return {"encoder": make_tiny_encoder(str(root / "enc")), "generator": make_tiny_generator(str(root / "gen")),
            "reranker": make_tiny_reranker(str(root / "rr"))}  # fmt: skip


def step_settings(estimator: str) -> StepSettings:
    return StepSettings(
        estimator=estimator, top_k=3, jsa=JSASettings(num_proposals=4), gumbel=GumbelSettings(k=2, candidates=4)
    )


def setup(model_dirs, estimator: str):
    torch.manual_seed(0)
    spec = ModelSpec(
        query_encoder=EncoderSpec(name_or_path=model_dirs["encoder"], pooling="mean", max_length=32),
        generator=model_dirs["generator"],
        reranker=model_dirs["reranker"],
        max_source_length=64,
        max_target_length=8,
    )
    models = build_models(spec, estimator)
    with torch.no_grad():
        vectors = models["query_encoder"]([passage_text(t, x) for t, x in zip(TITLES, TEXTS)]).numpy()
    step_models = StepModels(query_encoder=models["query_encoder"], generator=models["generator"],
                             generator_raw=models["generator"], posterior=models.get("posterior_encoder"),
                             reranker=models.get("reranker"))  # fmt: skip
    return models, step_models, ExactIndex(vectors.astype(np.float32))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_step_trains_exactly_the_estimators_models(model_dirs, estimator):
    models, step_models, index = setup(model_dirs, estimator)
    settings, batch = step_settings(estimator), Batch.from_rows(ROWS)
    roles = trainable_roles(estimator, train_generator=True)
    for m in models.values():
        m.train()
        m.zero_grad(set_to_none=True)
    rng = torch.Generator().manual_seed(0)
    out = run_step(step_models, index, batch, settings, rng=rng)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss), out.loss
    out.loss.backward()
    for role, model in models.items():
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert reached == (role in roles), (
            f"{estimator}: gradient reached {role}: {reached}, trains it: {role in roles}"
        )
    assert all(torch.is_tensor(v) and not v.requires_grad for v in out.diagnostics.values())


@pytest.mark.parametrize("estimator", ["rag-sequence", "rag-token", "vrag", "emdr2", "pdist", "gumbel-rerank"])
def test_a_step_on_a_fixed_batch_lowers_its_loss(model_dirs, estimator):
    """Deterministic losses only (JSA's value depends on its sampled chain, so it is left out here)."""
    models, step_models, index = setup(model_dirs, estimator)
    settings, batch = step_settings(estimator), Batch.from_rows(ROWS)
    params = [p for r in trainable_roles(estimator, train_generator=True) for p in models[r].parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    for m in models.values():
        m.eval()  # no dropout: the same batch must give the same loss before the update

    def loss() -> torch.Tensor:
        return run_step(step_models, index, batch, settings, rng=torch.Generator().manual_seed(0)).loss

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item(), (estimator, before.item(), after.item())
