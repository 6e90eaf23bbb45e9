"""JSA: the MIS sampler's law and acceptance rule, the chain cache, the loss and its gradients."""

from __future__ import annotations

import pickle

import pytest
import torch

from raggen.objectives import JSAChainCache, jsa_loss, jsa_mis_inputs, mis_sample, visited_mask

# Target and proposal deliberately far apart, so a wrong acceptance rule lands far from the target.
TARGET = torch.tensor([2.0, 1.0, 0.0, 0.5, -1.0, 1.5])
PROPOSAL = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.5, -1.0])


def _tv(states: torch.Tensor, log_target: torch.Tensor) -> float:
    """Total variation between the empirical law of ``states`` and softmax(log_target)."""
    counts = torch.bincount(states.flatten(), minlength=log_target.numel()).double()
    return 0.5 * (counts / counts.sum() - torch.softmax(log_target.double(), -1)).abs().sum().item()


def test_mis_stationary_law_is_the_target():
    # 20000 independent chains, final states after 40 steps. A rule that ignores the proposal
    # (min(1, p(z')/p(z))) gives TV ≈ 0.36 here, the exact rule ≈ 0.003.
    n = 20000
    gen = torch.Generator().manual_seed(0)
    states, accepted = mis_sample(TARGET.expand(n, -1), PROPOSAL.expand(n, -1), 40, generator=gen)
    assert states.shape == (n, 40) and states.dtype == torch.long and accepted.dtype == torch.bool
    assert _tv(states[:, -1], TARGET) < 0.02
    assert accepted[:, 0].all()  # no init: the chain starts at (accepts) its first proposal


def test_mis_first_move_from_init_is_accepted_with_the_mh_probability():
    # From state i, P(accept) = sum_j q_j min(1, w_j / w_i): checked for every starting state.
    n = 20000
    q = torch.softmax(PROPOSAL, -1)
    log_w = TARGET - PROPOSAL
    gen = torch.Generator().manual_seed(1)
    for start in range(TARGET.numel()):
        init = torch.full((n,), start)
        _, accepted = mis_sample(TARGET.expand(n, -1), PROPOSAL.expand(n, -1), 1, init=init, generator=gen)
        expected = (q * torch.clamp(torch.exp(log_w - log_w[start]), max=1.0)).sum().item()
        assert accepted[:, 0].float().mean().item() == pytest.approx(expected, abs=0.015)


def test_mis_rejected_steps_keep_the_state():
    gen = torch.Generator().manual_seed(2)
    states, accepted = mis_sample(TARGET.expand(50, -1), PROPOSAL.expand(50, -1), 30, generator=gen)
    held = states[:, 1:] == states[:, :-1]
    assert (held | accepted[:, 1:]).all()  # a state changes only on an accepted step
    assert (~accepted[:, 1:]).any() and accepted[:, 1:].any()


def test_mis_init_with_overwhelming_weight_never_moves_and_minus_one_starts_fresh():
    target = torch.tensor([[0.0, 0.0, 50.0, 0.0]]).expand(4, -1)
    proposal = torch.zeros(4, 4)
    init = torch.tensor([2, 2, -1, -1])
    states, accepted = mis_sample(target, proposal, 10, init=init, generator=torch.Generator().manual_seed(3))
    assert (states[:2] == 2).all()  # only self-proposals (z' = z, ratio 1) are accepted
    assert accepted[:2].float().mean() < 0.5
    assert accepted[2:, 0].all()


def test_mis_never_visits_zero_proposal_or_zero_target_candidates():
    target = torch.tensor([[0.0, float("-inf"), 0.0, 1.0]]).expand(500, -1)
    proposal = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]]).expand(500, -1)
    init = torch.full((500,), 1)  # starts on a zero-target state: it leaves at its first w > 0 proposal
    states, accepted = mis_sample(target, proposal, 20, init=init, generator=torch.Generator().manual_seed(4))
    at_init = states == 1
    assert (at_init[:, 1:] <= at_init[:, :-1]).all()  # once left, never back
    assert not at_init[:, -1].any() and not (states == 2).any()
    assert (accepted[:, 0] == ~at_init[:, 0]).all()


def test_mis_is_reproducible_and_builds_no_graph():
    log_target = TARGET.expand(8, -1).clone().requires_grad_(True)
    a = mis_sample(log_target, PROPOSAL.expand(8, -1), 12, generator=torch.Generator().manual_seed(5))
    b = mis_sample(log_target, PROPOSAL.expand(8, -1), 12, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].grad_fn is None and not a[0].requires_grad
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((TARGET.expand(2, -1), PROPOSAL.expand(3, -1), 4), {}),
        ((TARGET.expand(2, -1), PROPOSAL.expand(2, -1), 0), {}),
        ((TARGET.expand(2, -1), PROPOSAL.expand(2, -1), 3), {"init": torch.tensor([0, 6])}),
        ((TARGET.expand(2, -1), PROPOSAL.expand(2, -1), 3), {"init": torch.tensor([0])}),
        ((TARGET, PROPOSAL, 3), {}),
    ],
)
def test_mis_bad_input_raises(args, kwargs):
    with pytest.raises(ValueError):
        mis_sample(*args, **kwargs)


def test_persistent_chains_through_the_cache_reach_the_target():
    # One MIS step per "training step", chains carried across steps by passage id while the
    # candidate order is reshuffled every step: the cached chains still converge to the target.
    n, c = 4000, TARGET.numel()
    cache = JSAChainCache()
    gen = torch.Generator().manual_seed(6)
    example_ids = list(range(n))
    passage_of = [f"p{i}" for i in range(c)]
    for _ in range(30):
        perm = torch.randperm(c, generator=gen)
        candidate_ids = [[passage_of[i] for i in perm.tolist()]] * n
        init = cache.get(example_ids, candidate_ids)
        states, _ = mis_sample(TARGET[perm].expand(n, -1), PROPOSAL[perm].expand(n, -1), 1, init=init, generator=gen)
        cache.update(example_ids, candidate_ids, states[:, -1])
    final = torch.tensor([passage_of.index(cache.state_dict()["states"][i]) for i in example_ids])
    assert _tv(final, TARGET) < 0.03


def test_cache_get_update_by_passage_id():
    cache = JSAChainCache()
    assert (cache.get(["a", "b"], [[10, 11, 12], [20, 21, 22]]) == -1).all()
    cache.update(["a", "b"], [[10, 11, 12], [20, 21, 22]], torch.tensor([2, 0]))
    assert len(cache) == 2
    # New candidate lists: "a"'s passage 12 moved to index 0; "b"'s passage 20 is gone.
    init = cache.get(["a", "b", "c"], torch.tensor([[12, 13, 10], [21, 22, 23], [1, 2, 3]]))
    assert init.tolist() == [0, -1, -1]
    # Tensor example ids are keyed by their value.
    assert cache.get([torch.tensor(7)], [[5]]).tolist() == [-1]
    cache.update([torch.tensor(7)], [[5]], torch.tensor([0]))
    assert cache.get([7], [[9, 5]]).tolist() == [1]


def test_cache_restart_flag_and_checkpoint_round_trip():
    cache = JSAChainCache()
    cache.update([1, 2], [["x", "y"], ["y", "z"]], torch.tensor([1, 1]))
    restored = JSAChainCache()
    restored.load_state_dict(pickle.loads(pickle.dumps(cache.state_dict())))
    assert restored.get([1, 2], [["y", "x"], ["z", "q"]]).tolist() == [0, 0]
    fresh = JSAChainCache(restart_chains=True)
    fresh.load_state_dict(cache.state_dict())
    assert fresh.get([1, 2], [["y", "x"], ["z", "q"]]).tolist() == [-1, -1]
    with pytest.raises(ValueError):
        restored.load_state_dict({"states": []})


def test_cache_rejects_bad_updates():
    cache = JSAChainCache()
    with pytest.raises(ValueError):
        cache.update([1], [["x", None]], torch.tensor([1]))  # padding slot is not a passage
    with pytest.raises(ValueError):
        cache.update([1], [["x"]], torch.tensor([3]))
    with pytest.raises(ValueError):
        cache.get([1, 2], [["x"]])


def _loss_case(seed: int, b: int = 3, c: int = 5, s: int = 7):
    g = torch.Generator().manual_seed(seed)
    seq = -torch.rand(b, c, generator=g, dtype=torch.float64) * 5
    prior = torch.randn(b, c, generator=g, dtype=torch.float64)
    post = torch.randn(b, c, generator=g, dtype=torch.float64)
    states = torch.randint(0, c, (b, s), generator=g)
    return seq, prior, post, states


def test_jsa_loss_matches_brute_force_and_routes_gradients_only_through_visited_states():
    seq, prior, post, states = _loss_case(7)
    b, c = seq.shape
    s = states.shape[1]
    leaves = [x.clone().requires_grad_(True) for x in (seq, prior, post)]
    accepted = torch.rand(b, s) < 0.5
    loss, diagnostics = jsa_loss(*leaves, states, accepted=accepted)
    expected = 0.0
    for i in range(b):
        log_p, log_q = torch.log_softmax(prior[i], -1), torch.log_softmax(post[i], -1)
        for z in states[i].tolist():
            expected += -seq[i, z] - log_p[z] - log_q[z]
    assert loss.item() == pytest.approx(expected.item() / (b * s), rel=1e-12)
    g_seq, g_prior, g_post = torch.autograd.grad(loss, leaves)
    counts = torch.zeros(b, c, dtype=torch.float64).scatter_add_(1, states, torch.ones(b, s, dtype=torch.float64))
    torch.testing.assert_close(g_seq, -counts / (b * s))  # zero on unvisited candidates
    for grad, logits in ((g_prior, prior), (g_post, post)):  # (s * softmax - counts) / (b * s)
        torch.testing.assert_close(grad, (s * torch.softmax(logits, -1) - counts) / (b * s))
    assert diagnostics["acceptance_rate"].item() == pytest.approx(accepted.float().mean().item())
    distinct = visited_mask(states, c).sum(-1).double().mean().item()
    assert diagnostics["distinct_states"].item() == pytest.approx(distinct)
    assert all(not v.requires_grad for v in diagnostics.values())


def test_full_step_gives_grads_to_generator_prior_posterior_and_none_through_the_sampler():
    # Parameters -> seq / prior / posterior logits -> MIS (no grad) -> loss. The gradient must be
    # the one of the loss with the sampled states held constant.
    g = torch.Generator().manual_seed(8)
    b, c, d = 4, 6, 3
    passages = torch.randn(c, d, generator=g, dtype=torch.float64)
    gen_param = torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True)
    prior_q = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    post_q = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    seq = torch.nn.functional.logsigmoid(gen_param) * 3
    prior, post = prior_q @ passages.T, post_q @ passages.T
    log_target, log_proposal = jsa_mis_inputs(seq, prior, post)
    assert not log_target.requires_grad and not log_proposal.requires_grad
    states, accepted = mis_sample(log_target, log_proposal, 9, generator=g)
    loss, _ = jsa_loss(seq, prior, post, states, accepted=accepted)
    grads = torch.autograd.grad(loss, (gen_param, prior_q, post_q), retain_graph=True)
    assert all(gr.abs().sum() > 0 for gr in grads)
    const = [x.detach().requires_grad_(True) for x in (seq, prior, post)]
    ref_loss, _ = jsa_loss(*const, states)
    d_seq, d_prior, d_post = torch.autograd.grad(ref_loss, const)
    torch.testing.assert_close(grads[1], d_prior @ passages)
    torch.testing.assert_close(grads[2], d_post @ passages)
    (ref_gen,) = torch.autograd.grad(seq, gen_param, d_seq)
    torch.testing.assert_close(grads[0], ref_gen)


def test_mis_inputs_and_loss_share_temperature_and_padding():
    seq, prior, post, states = _loss_case(9, c=4)
    hot, _ = jsa_loss(seq, prior, post, states, temperature=0.1)
    scaled, _ = jsa_loss(seq, prior / 0.1, post / 0.1, states)
    assert hot.item() == pytest.approx(scaled.item(), rel=1e-12)
    valid = torch.tensor([[True, True, False, True]]).expand(seq.shape[0], -1)
    log_target, log_proposal = jsa_mis_inputs(seq, prior, post, temperature=0.1, candidate_mask=valid)
    assert torch.isneginf(log_target[:, 2]).all() and torch.isneginf(log_proposal[:, 2]).all()
    torch.testing.assert_close(log_proposal.exp().sum(-1), torch.ones(seq.shape[0], dtype=torch.float64))
    sampled, _ = mis_sample(log_target, log_proposal, 50, generator=torch.Generator().manual_seed(10))
    assert not (sampled == 2).any()


def test_jsa_loss_bad_states_raise():
    seq, prior, post, states = _loss_case(11)
    with pytest.raises(ValueError):
        jsa_loss(seq, prior, post, states + seq.shape[1])
    with pytest.raises(ValueError):
        jsa_loss(seq, prior, post, states[:-1])
    with pytest.raises(ValueError):
        jsa_loss(seq, prior[:, :-1], post, states)
