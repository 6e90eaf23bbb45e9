"""JSA-RAG: joint stochastic approximation training of RAG (Cao, Ou et al. 2025).

The passage z is a latent variable. Each step draws z from the true posterior
p(z | x, y) ∝ p(z|x) p(y|x,z) over the candidates with a Metropolis independence sampler (MIS)
whose proposal is the posterior retriever q(z|x,y), then takes one gradient step on

    loss = mean over the chain's states s of [ -log p(y|x,z_s) - log p(z_s|x) - log q(z_s|x,y) ]

which moves the generator and the prior towards the data (an EM-like M-step on sampled z) and
the posterior retriever towards the true posterior (inclusive KL, so q keeps covering it).
The sampler is not differentiated: the states are constants of the loss.

Options of the official code (an Atlas fork), all plain arguments here: retriever scores divided
by a temperature of 0.1, 50 proposals per example (``num_steps``), and the generator likelihood
length-normalised (mean over target tokens, ``_common.sequence_logprob(length_normalize=True)``).
Our default keeps the exact summed likelihood and temperature 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from raggen.objectives._common import (
    check_dims,
    check_same_shape,
    detached,
    entropy,
    masked_scores,
    scaled_scores,
)


@torch.no_grad()
def mis_sample(
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    num_steps: int,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Metropolis independence sampler over C candidates per row (**contract**).

    log_target, log_proposal: (b, c), each up to an additive constant per row. Proposals
    z' ~ softmax(log_proposal), drawn independently of the current state; a move z -> z' is
    accepted with min(1, w(z') / w(z)), w = exp(log_target - log_proposal). The stationary law
    is softmax(log_target). ``init`` (b,) long: a cached state per row (-1 = none); the chain's
    first step proposes a move away from it. Rows without init start at the first proposal
    (accepted[:, 0] True). Returns states (b, num_steps) long and accepted (b, num_steps) bool.
    Runs without autograd: nothing upstream of the sampler gets a gradient through it.
    """
    check_dims("log_target", log_target, 2)
    check_same_shape(("log_target", "log_proposal"), log_target, log_proposal)
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    b, c = log_target.shape
    proposal_probs = torch.softmax(log_proposal.float(), dim=-1)  # (b, c)
    if not bool(torch.isfinite(proposal_probs).all()):
        raise ValueError("log_proposal: every row needs at least one finite entry")
    proposals = torch.multinomial(proposal_probs, num_steps, replacement=True, generator=generator)
    uniforms = torch.rand(b, num_steps, generator=generator, device=log_target.device)  # (b, s)
    log_w = log_target.float() - log_proposal.float()  # (b, c)
    log_w = log_w.masked_fill(log_target == float("-inf"), float("-inf"))  # w = 0 off the target

    current = _initial_state(init, b, c, log_target.device)  # (b,), -1 = no state yet
    states = torch.empty(b, num_steps, dtype=torch.long, device=log_target.device)
    accepted = torch.empty(b, num_steps, dtype=torch.bool, device=log_target.device)
    rows = torch.arange(b, device=log_target.device)
    for s in range(num_steps):
        proposed = proposals[:, s]  # (b,)
        has_state = current >= 0
        lw_current = log_w[rows, current.clamp_min(0)]  # (b,)
        lw_proposed = log_w[rows, proposed]
        ratio = lw_proposed - lw_current  # log w(z') - log w(z)
        # min(1, w(z')/w(z)); a zero-weight current state (w(z) = 0) leaves for any z' with w(z') > 0.
        move = (torch.log(uniforms[:, s]) < ratio) | (lw_current == float("-inf"))
        accept = (move & (lw_proposed > float("-inf"))) | ~has_state
        current = torch.where(accept, proposed, current)
        states[:, s] = current
        accepted[:, s] = accept
    return states, accepted


def _initial_state(init: torch.Tensor | None, b: int, c: int, device: torch.device) -> torch.Tensor:
    if init is None:
        return torch.full((b,), -1, dtype=torch.long, device=device)
    if tuple(init.shape) != (b,):
        raise ValueError(f"init: expected shape {(b,)}, got {tuple(init.shape)}")
    init = init.to(device=device, dtype=torch.long)
    if bool(((init < -1) | (init >= c)).any()):
        raise ValueError(f"init: states must be -1 (none) or in [0, {c}), got {init.tolist()}")
    return init


def jsa_mis_inputs(
    seq_logprob: torch.Tensor,
    prior_logits: torch.Tensor,
    posterior_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    candidate_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_target, log_proposal) for ``mis_sample``, detached, each (b, c).

    log_target = log p(z|x) + log p(y|x,z); log_proposal = log q(z|x,y); p and q are softmaxes
    of the (temperature-scaled) logits over the candidates. Use the same ``temperature`` and
    likelihood (summed or length-normalised) here and in ``jsa_loss``.
    """
    check_dims("seq_logprob", seq_logprob, 2)
    check_same_shape(("seq_logprob", "prior_logits", "posterior_logits"), seq_logprob, prior_logits, posterior_logits)
    with torch.no_grad():
        log_prior = torch.log_softmax(masked_scores(scaled_scores(prior_logits, temperature), candidate_mask), -1)
        log_post = torch.log_softmax(masked_scores(scaled_scores(posterior_logits, temperature), candidate_mask), -1)
        return log_prior + seq_logprob, log_post


def jsa_loss(
    seq_logprob: torch.Tensor,
    prior_logits: torch.Tensor,
    posterior_logits: torch.Tensor,
    states: torch.Tensor,
    *,
    accepted: torch.Tensor | None = None,
    temperature: float = 1.0,
    candidate_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """JSA loss on the sampled states (formula in the module docstring) and diagnostics.

    seq_logprob: (b, c) log p(y|x,z) with grad; only the entries at visited states are read, so a
    caller may fill the others with no-grad values (see ``visited_mask``). prior_logits,
    posterior_logits: (b, c). states: (b, s) long from ``mis_sample`` (repeats included: the
    chain average counts a state once per step it was held). Returns the mean over b and s.
    Diagnostics: generator_nll, prior_nll, posterior_nll, prior_entropy, posterior_entropy,
    distinct_states (per example), and acceptance_rate when ``accepted`` is given.
    """
    check_dims("seq_logprob", seq_logprob, 2)
    check_same_shape(("seq_logprob", "prior_logits", "posterior_logits"), seq_logprob, prior_logits, posterior_logits)
    check_dims("states", states, 2)
    if states.shape[0] != seq_logprob.shape[0]:
        raise ValueError(f"states: expected {seq_logprob.shape[0]} rows, got {tuple(states.shape)}")
    if bool(((states < 0) | (states >= seq_logprob.shape[1])).any()):
        raise ValueError(f"states: indices must be in [0, {seq_logprob.shape[1]})")
    states = states.detach()
    log_prior = torch.log_softmax(masked_scores(scaled_scores(prior_logits, temperature), candidate_mask), -1)
    log_post = torch.log_softmax(masked_scores(scaled_scores(posterior_logits, temperature), candidate_mask), -1)
    gen_nll = -seq_logprob.gather(1, states)  # (b, s)
    prior_nll = -log_prior.gather(1, states)  # (b, s)
    post_nll = -log_post.gather(1, states)  # (b, s)
    loss = (gen_nll + prior_nll + post_nll).mean()

    values: dict[str, Any] = dict(
        generator_nll=gen_nll,
        prior_nll=prior_nll,
        posterior_nll=post_nll,
        prior_entropy=entropy(log_prior.detach()),
        posterior_entropy=entropy(log_post.detach()),
        distinct_states=visited_mask(states, seq_logprob.shape[1]).sum(-1).float(),
    )
    if accepted is not None:
        values["acceptance_rate"] = accepted.float()
    return loss, detached(**values)


def visited_mask(states: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """(b, c) bool: which candidates the chain visited, i.e. the only (x, z) pairs that need a
    generator forward pass *with* gradient for ``jsa_loss``."""
    mask = torch.zeros(states.shape[0], num_candidates, dtype=torch.bool, device=states.device)
    return mask.scatter_(1, states, True)


class JSAChainCache:
    """Persistent MIS chain states, one per training example, keyed by example id.

    Stores the *passage id* of each chain's current state, not its candidate index, so a state
    survives the candidate list changing between steps (new retriever, refreshed index). A
    cached passage that is not among this step's candidates gives no init (-1): that chain
    restarts at its first proposal. ``restart_chains=True`` is the official code's behaviour:
    ``get`` always returns -1, every step starts fresh chains.
    """

    def __init__(self, restart_chains: bool = False) -> None:
        self.restart_chains = restart_chains
        self._state: dict[Hashable, Hashable] = {}

    def __len__(self) -> int:
        return len(self._state)

    def get(
        self, example_ids: Sequence[Hashable], candidate_ids: Sequence[Sequence[Hashable]] | torch.Tensor
    ) -> torch.Tensor:
        """init (b,) long for ``mis_sample``: the cached state's index among this step's
        candidates ``candidate_ids[b]`` (passage ids, None for padding), or -1."""
        ids = _as_id_lists(candidate_ids, len(example_ids))
        init = torch.full((len(example_ids),), -1, dtype=torch.long)
        if self.restart_chains:
            return init
        for row, (example_id, candidates) in enumerate(zip(example_ids, ids)):
            cached = self._state.get(_key(example_id))
            if cached is not None and cached in candidates:
                init[row] = candidates.index(cached)
        return init

    def update(
        self,
        example_ids: Sequence[Hashable],
        candidate_ids: Sequence[Sequence[Hashable]] | torch.Tensor,
        last_states: torch.Tensor,
    ) -> None:
        """Remember each chain's final state (b,) (an index into ``candidate_ids[b]``)."""
        ids = _as_id_lists(candidate_ids, len(example_ids))
        if tuple(last_states.shape) != (len(example_ids),):
            raise ValueError(f"last_states: expected shape {(len(example_ids),)}, got {tuple(last_states.shape)}")
        for example_id, candidates, state in zip(example_ids, ids, last_states.tolist()):
            if not 0 <= state < len(candidates) or candidates[state] is None:
                raise ValueError(f"last_states: state {state} is not a candidate of example {example_id!r}")
            self._state[_key(example_id)] = candidates[state]

    def clear(self) -> None:
        self._state.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable contents for checkpoints."""
        return {"version": 1, "restart_chains": self.restart_chains, "states": dict(self._state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1 or not isinstance(state.get("states"), dict):
            raise ValueError("JSAChainCache.load_state_dict: expected {'version': 1, 'states': {...}}")
        self._state = dict(state["states"])


def _key(example_id: Hashable) -> Hashable:
    """Tensor ids (0-dim) become Python ints so lookups and checkpoints agree."""
    return example_id.item() if isinstance(example_id, torch.Tensor) else example_id


def _as_id_lists(candidate_ids: Sequence[Sequence[Hashable]] | torch.Tensor, b: int) -> list[list[Hashable]]:
    ids = candidate_ids.tolist() if isinstance(candidate_ids, torch.Tensor) else [list(c) for c in candidate_ids]
    if len(ids) != b:
        raise ValueError(f"candidate_ids: expected {b} rows (one per example id), got {len(ids)}")
    return ids
