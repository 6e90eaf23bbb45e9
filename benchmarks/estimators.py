"""Estimator costs and retriever-gradient noise: JSA vs RAG-Sequence vs VRAG on a tiny BART.

    .venv/bin/python benchmarks/estimators.py [--threads 1] [--draws 200] [--reps 10]

1. Time of one training step (forward + backward, median over ``--reps``):
   RAG-Sequence (K pairs forward with grad) vs JSA (no-grad scoring of every candidate, MIS,
   a grad forward on the visited pairs only, backward), same batch and K.
2. Gradient noise w.r.t. the prior and posterior retriever logits over ``--draws`` repeated draws
   on fixed data (the tiny BART's log p(y|x,z) of a C-candidate union): JSA (fresh MIS chains),
   VRAG exact (enumerates q's top-K: no noise) and VRAG sampled (score function). Variance is
   the trace of the gradient covariance per example; bias² is the squared distance of the mean
   gradient from the reference named in the table.

The BART is random (init_std 0.1, so that passages change log p(y|x,z) by ~0.7 nats); the
posterior retriever is a stand-in for a partly trained one: the true posterior's logits plus
N(0, 1) noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from raggen.objectives import (
    jsa_loss,
    jsa_mis_inputs,
    mis_sample,
    rag_sequence_nll,
    sequence_logprob,
    truncated_log_softmax,
    visited_mask,
    vrag_loss,
)

PAD, EOS, VOCAB, DIM = 1, 2, 1000, 32


def tiny_bart() -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=128,
        init_std=0.1,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
    )
    return BartForConditionalGeneration(config).train()


def make_batch(b: int, c: int, input_len: int, target_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(question, passage) inputs (b, c, l), answers (b, t) ending in eos, some padded."""
    inputs = torch.randint(3, VOCAB, (b, c, input_len), generator=gen)
    target = torch.randint(3, VOCAB, (b, target_len), generator=gen)
    lengths = torch.randint(target_len // 2, target_len + 1, (b,), generator=gen)
    for row, length in enumerate(lengths.tolist()):
        target[row, length - 1] = EOS
        target[row, length:] = PAD
    passages = torch.randn(b, c, DIM, generator=gen)  # retriever embeddings of the candidates
    return {"inputs": inputs, "target": target, "mask": target.ne(PAD), "passages": passages}


def pair_token_logprobs(model, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x, z, y_<t) (n, t) for n (question+passage, answer) pairs."""
    decoder_inputs = torch.cat([torch.full_like(target[:, :1], EOS), target[:, :-1]], dim=1)
    logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits  # (n, t, v)
    return torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def all_pairs_seq_logprob(model, batch, grad: bool) -> torch.Tensor:
    """log p(y | x, z) (b, c) for every candidate."""
    b, c, length = batch["inputs"].shape
    with torch.set_grad_enabled(grad):
        inputs, target = batch["inputs"].reshape(b * c, length), batch["target"].repeat_interleave(c, 0)
        tok = pair_token_logprobs(model, inputs, target)  # (b * c, t)
    return sequence_logprob(tok.view(b, c, -1), batch["mask"])


def rag_sequence_step(model, batch, prior_q) -> dict[str, float]:
    b, c, length = batch["inputs"].shape
    doc_scores = retriever_logits(batch["passages"], prior_q)  # (b, c)
    tok = pair_token_logprobs(model, batch["inputs"].reshape(b * c, length), batch["target"].repeat_interleave(c, 0))
    rag_sequence_nll(doc_scores, tok.view(b, c, -1), batch["mask"]).mean().backward()
    return {"grad_pairs": float(b * c)}


def jsa_step(model, batch, prior_q, post_q, num_steps: int, gen: torch.Generator) -> dict[str, float]:
    b, c, length = batch["inputs"].shape
    prior = retriever_logits(batch["passages"], prior_q)  # (b, c)
    post = retriever_logits(batch["passages"], post_q)
    seq_nograd = all_pairs_seq_logprob(model, batch, grad=False)  # (b, c), scoring pass
    states, accepted = mis_sample(*jsa_mis_inputs(seq_nograd, prior, post), num_steps, generator=gen)
    visited = visited_mask(states, c)  # (b, c): only these pairs need a grad forward
    rows, cols = visited.nonzero(as_tuple=True)
    tok = pair_token_logprobs(model, batch["inputs"][rows, cols], batch["target"][rows])  # (m, t)
    seq_visited = (tok * batch["mask"][rows]).sum(-1)  # (m,)
    seq = seq_nograd.masked_scatter(visited, seq_visited)  # grad on visited entries only
    loss, diagnostics = jsa_loss(seq, prior, post, states, accepted=accepted)
    loss.backward()
    return {"grad_pairs": float(len(rows)), "acceptance": diagnostics["acceptance_rate"].item()}


def time_steps(steps: dict, params, reps: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Median ms per step of each named step, run interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    infos: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for i in range(reps + 2):
        for name, step in steps.items():
            for p in params:
                p.grad = None
            start = time.perf_counter()
            info = step()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
                infos[name].append(info)
    return {
        name: (
            statistics.median(times[name]) * 1000,
            {key: statistics.mean(d[key] for d in infos[name]) for key in infos[name][0]},
        )
        for name in steps
    }


def retriever_logits(passages: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Inner products (b, c), scaled by 1/sqrt(dim) so random queries give O(1) logits."""
    return (passages * query.unsqueeze(1)).sum(-1) / DIM**0.5


def gradient_stats(grads: list[torch.Tensor], reference: torch.Tensor) -> tuple[float, float]:
    """(trace of covariance per example, squared bias per example) of per-draw gradients (b, c)."""
    stacked = torch.stack(grads).double()  # (d, b, c)
    mean = stacked.mean(0)
    b = reference.shape[0]
    variance = ((stacked - mean) ** 2).sum((1, 2)).mean().item() / b
    return variance, ((mean - reference.double()) ** 2).sum().item() / b


def retriever_gradients(estimator, prior, post, draws: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-draw d loss / d (prior logits, posterior logits), per example (sum over the batch)."""
    out_prior, out_post = [], []
    for _ in range(draws):
        p, q = prior.clone().requires_grad_(True), post.clone().requires_grad_(True)
        loss = estimator(p, q) * prior.shape[0]
        g_p, g_q = torch.autograd.grad(loss, (p, q), allow_unused=True)
        out_prior.append(g_p if g_p is not None else torch.zeros_like(prior))
        out_post.append(g_q)
    return out_prior, out_post


def variance_table(
    model, b: int, c: int, topk: int, num_steps: int, draws: int, seed: int
) -> tuple[list[tuple], float, float]:
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(b, c, 48, 8, gen)
    seq = all_pairs_seq_logprob(model.eval(), batch, grad=False)  # (b, c) fixed data
    prior = retriever_logits(batch["passages"], torch.randn(b, DIM, generator=gen))
    log_true_post = torch.log_softmax(torch.log_softmax(prior, -1) + seq, -1)
    post = log_true_post + torch.randn(b, c, generator=gen)
    p, true_post = torch.softmax(prior, -1), log_true_post.exp()
    log_qk, _ = truncated_log_softmax(post, topk)
    marginal_ref = p - true_post  # d(-log p(y|x)) / d prior logits

    def jsa(pr, po):
        states, _ = mis_sample(*jsa_mis_inputs(seq, pr, po), num_steps, generator=gen)
        return jsa_loss(seq, pr, po, states)[0]

    def vrag_exact(pr, po):
        return vrag_loss(pr, po, seq, posterior_topk=topk)[0]

    def vrag_sampled(pr, po):
        return vrag_loss(pr, po, seq, posterior_topk=topk, num_samples=num_steps, generator=gen)[0]

    exact_vrag = retriever_gradients(vrag_exact, prior, post, 1)
    rows = []
    for name, fn, n_draws, post_ref in (
        (f"JSA (MIS, {num_steps} steps, fresh chain)", jsa, draws, torch.softmax(post, -1) - true_post),
        (f"VRAG exact (top-{topk} enumeration)", vrag_exact, 1, exact_vrag[1][0]),
        (f"VRAG sampled ({num_steps} samples, score fn)", vrag_sampled, draws, exact_vrag[1][0]),
    ):
        g_prior, g_post = retriever_gradients(fn, prior, post, n_draws)
        var_p, bias_p = gradient_stats(g_prior, marginal_ref)
        var_q, bias_q = gradient_stats(g_post, post_ref)
        rows.append((name, n_draws, var_p, bias_p, var_p + bias_p, var_q, bias_q))
    spread = seq.std(-1).mean().item()
    qk_vs_post = 0.5 * (log_qk.exp() - true_post).abs().sum(-1).mean().item()
    return rows, spread, qk_vs_post


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--mis-steps", type=int, default=50, help="MIS proposals per example (official JSA-RAG: 50)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} thread(s)), "
        f"load avg {os.getloadavg()[0]:.1f}"
    )

    model = tiny_bart()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    b, k = args.batch, args.k
    print(
        f"model: BART vocab {VOCAB}, d_model 128, 2+2 layers ({n_params / 1e6:.2f}M params); batch {b}, "
        f"input 48 tokens, answer <= 8 tokens\n"
    )
    prior_q = torch.randn(b, DIM, requires_grad=True)
    post_q = torch.randn(b, DIM, requires_grad=True)
    batch_k, batch_2k = make_batch(b, k, 48, 8, gen), make_batch(b, 2 * k, 48, 8, gen)
    steps = {
        f"RAG-Sequence, K={k}": lambda: rag_sequence_step(model, batch_k, prior_q),
        f"JSA, C={k}, {args.mis_steps} MIS steps": lambda: jsa_step(
            model, batch_k, prior_q, post_q, args.mis_steps, gen
        ),
        f"JSA, C={2 * k} (two top-{k}s), {args.mis_steps} MIS steps": lambda: jsa_step(
            model, batch_2k, prior_q, post_q, args.mis_steps, gen
        ),
    }
    results = time_steps(steps, [*model.parameters(), prior_q, post_q], args.reps)
    rag_ms = results[f"RAG-Sequence, K={k}"][0]
    print(
        f"{'training step (forward + backward)':44s} {'ms/step':>8s} {'grad pairs':>10s} {'MIS acc.':>8s} "
        f"{'vs RAG-Seq':>10s}"
    )
    for name, (ms, info) in results.items():
        acceptance = f"{info['acceptance']:8.2f}" if "acceptance" in info else f"{'-':>8s}"
        print(f"{name:44s} {ms:8.1f} {info['grad_pairs']:10.1f} {acceptance} {ms / rag_ms:9.2f}x")

    c, topk = 2 * k, k
    rows, spread, qk_vs_post = variance_table(model, b, c, topk, args.mis_steps, args.draws, args.seed + 1)
    print(
        f"\nretriever gradient noise, fixed data: batch {b}, C={c} candidates, std of log p(y|x,z) over "
        f"candidates {spread:.2f} nats, TV(q_top{topk}, true posterior) {qk_vs_post:.2f}"
    )
    print(
        "prior bias² vs the marginal-likelihood gradient softmax(prior) - p(z|x,y); posterior bias² vs the\n"
        "estimator's own exact objective (JSA: q - p(z|x,y); VRAG: the exact top-K ELBO gradient)"
    )
    print(
        f"{'estimator':44s} {'draws':>5s} {'var prior':>10s} {'bias² prior':>11s} {'MSE prior':>10s} "
        f"{'var post':>10s} {'bias² post':>10s}"
    )
    for name, n_draws, var_p, bias_p, mse_p, var_q, bias_q in rows:
        print(f"{name:44s} {n_draws:5d} {var_p:10.4f} {bias_p:11.4f} {mse_p:10.4f} {var_q:10.4f} {bias_q:10.4f}")


if __name__ == "__main__":
    main()
