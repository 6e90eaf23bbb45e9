"""Pre-train the quickstart's small reader to read answer spans, on an endless stream of fresh facts.

A reader trained from scratch on a fixed QA set memorises it; trained on entities invented anew for
every batch (``world.reader_examples``) it cannot, but a small one trained on the answer's
likelihood alone still settles into a language model of answers that ignores the passage
(``passage_reliance`` ~ 0). What reads: an encoder warm-started from MiniLM
(``raggen.models.warm_start``) plus an extractive start/end loss on the encoder states
(``span_weight``). End-to-end RAG training then has retrieval left to learn. ``make reader``
rebuilds the shipped ``raggen/assets/reader`` this way.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from raggen.corpus.world import reader_examples
from raggen.devices import pick_device
from raggen.models.generator import Generator
from raggen.models.tiny import make_tiny_generator
from raggen.train.qa_scores import normalize_answer

log = logging.getLogger(__name__)

# A ~8M-parameter BART (two thirds of it the 30522 x 192 embedding); sized so 2 CPU cores pre-train it.
READER_DIMS = {"d_model": 192, "layers": 2, "heads": 4, "ffn": 768}


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_spans(input_ids: torch.Tensor, answer_ids: list[list[int]]) -> torch.Tensor:
    """(b, 2) first and last position of each answer's token ids inside its row of ``input_ids``
    (the last occurrence: the passage follows the question), -100 where it does not occur whole."""
    spans = torch.full((len(answer_ids), 2), -100, dtype=torch.long)
    for i, (row, ans) in enumerate(zip(input_ids.tolist(), answer_ids)):
        n = len(ans)
        for start in range(len(row) - n, -1, -1) if n else ():
            if row[start : start + n] == ans:
                spans[i] = torch.tensor([start, start + n - 1])
                break
    return spans


def span_loss(span_logits: torch.Tensor, attention_mask: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Extractive-QA cross-entropy of the answer's start and end over the encoder positions.

    span_logits (b, s, 2), attention_mask (b, s), spans (b, 2) with -100 for rows without a span.
    """
    logits = span_logits.float().masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(torch.float32).min)
    spans = spans.to(logits.device)
    if bool((spans[:, 0] < 0).all()):
        return span_logits.float().sum() * 0.0  # keeps the graph; the masked logits would give -inf * 0
    start = torch.nn.functional.cross_entropy(logits[..., 0], spans[:, 0], ignore_index=-100)
    end = torch.nn.functional.cross_entropy(logits[..., 1], spans[:, 1], ignore_index=-100)
    return (start + end) / 2


def reader_param_groups(model: torch.nn.Module, lr: float, encoder_lr: float | None) -> list[dict]:
    """AdamW groups with a ``peak_lr`` each: the encoder side (encoder + shared embeddings, which a
    tied LM head shares) at ``encoder_lr``, the rest at ``lr``; one group when ``encoder_lr`` is None."""
    named = list(model.named_parameters())  # tied weights are listed once, under their first name
    if encoder_lr is None:
        return [{"params": [p for _, p in named], "lr": lr, "peak_lr": lr}]
    encoder_side = [p for n, p in named if ".encoder." in f".{n}" or n.endswith("shared.weight")]
    ids = {id(p) for p in encoder_side}
    rest = [p for _, p in named if id(p) not in ids]
    return [
        {"params": encoder_side, "lr": encoder_lr, "peak_lr": encoder_lr},
        {"params": rest, "lr": lr, "peak_lr": lr},
    ]


@torch.no_grad()
def reader_exact_match(generator: Generator, examples: list[tuple[str, str, str]], batch_size: int = 32) -> float:
    """Greedy-decoded exact match of the reader given the gold passage (what pre-training teaches)."""
    generator.eval()
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = generator.tokenize_sources([q for q, _, _ in chunk], [[p] for _, p, _ in chunk])
        out = generator.model.generate(
            **batch, max_new_tokens=generator.max_target_length, num_beams=1, do_sample=False
        )
        hits += sum(
            normalize_answer(generator.decode(ids)) == normalize_answer(a) for ids, (_, _, a) in zip(out, chunk)
        )
    generator.train()
    return hits / max(1, len(examples))


@torch.no_grad()
def passage_reliance(generator: Generator, examples: list[tuple[str, str, str]], batch_size: int = 16) -> float:
    """Mean log p(answer | question, gold passage) - log p(answer | question, the next example's
    passage), in nats. Near 0: the reader ignores the passage (a language model of answers), and
    end-to-end training gets no signal about which passage is right."""
    from raggen.objectives import sequence_logprob

    generator.eval()
    gaps = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        others = [examples[(i + j + 1) % len(examples)][1] for j in range(len(chunk))]
        tok, mask = generator.token_logprobs(
            [q for q, _, _ in chunk], [[p, o] for (_, p, _), o in zip(chunk, others)], [a for _, _, a in chunk]
        )
        seq = sequence_logprob(tok, mask)  # (b, 2)
        gaps.extend((seq[:, 0] - seq[:, 1]).tolist())
    generator.train()
    return sum(gaps) / max(1, len(gaps))


def reader_loss(
    generator: Generator, batch: list[tuple[str, str, str]], span_head: torch.nn.Module | None, span_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token NLL of the answers given the gold passages (+ ``span_weight`` x the span loss).

    ``loss`` in the returned record stays the token NLL alone, comparable across recipes."""
    questions, passages, answers = [q for q, _, _ in batch], [[p] for _, p, _ in batch], [a for _, _, a in batch]
    encoded = generator.encode(questions, passages)
    logprobs, mask = generator.token_logprobs(questions, passages, answers, encoded=encoded)  # (b, 1, t), (b, t)
    nll = -logprobs.sum() / mask.sum()
    if span_head is None:
        return nll, {"loss": nll.item()}
    answer_ids = generator.tokenizer(answers, add_special_tokens=False)["input_ids"]
    spans = answer_spans(encoded.input_ids.cpu(), answer_ids)
    aux = span_loss(span_head(encoded.hidden), encoded.attention_mask, spans)
    return nll + span_weight * aux, {"loss": nll.item(), "span_loss": aux.item()}


def pretrain_reader(
    out_dir: str,
    steps: int = 3000,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 1e-3,
    warmup: int = 200,
    eval_every: int = 250,
    eval_examples: int = 200,
    max_source_length: int = 192,
    init_from: str | None = None,
    dims: dict[str, int] | None = None,
    save_dtype: torch.dtype | None = None,
    encoder_lr: float | None = None,
    span_weight: float = 0.0,
) -> dict:
    """Train, evaluate on held-out fresh entities, save (safetensors + tokenizer) atomically to ``out_dir``.

    Writes ``metrics.jsonl`` beside the model. ``init_from`` continues from an existing reader (or
    starts from a warm-started one); ``save_dtype=torch.float16`` writes the final weights in 16 bits,
    as the shipped reader is stored (``Generator.from_pretrained`` computes in fp32 on CPU).
    ``encoder_lr`` gives the encoder and the shared token embeddings their own peak rate: a
    warm-started encoder wants a fine-tuning rate, the freshly initialised decoder a larger one.
    ``span_weight`` > 0 adds an extractive-QA loss on the encoder states (a linear start/end head
    that is not saved): it tells the encoder where the answer is, which the answer's likelihood
    alone teaches slowly (a small reader first settles into a language model of answers).
    """
    torch.manual_seed(seed)
    device = pick_device()
    if init_from is None:
        init_from = make_tiny_generator(
            os.path.join(out_dir + ".init"), kind="bart", seed=seed, **(dims or READER_DIMS)
        )
    generator = Generator.from_pretrained(
        init_from, max_source_length=max_source_length, max_target_length=16, device=device
    )
    span_head = torch.nn.Linear(generator.model.config.d_model, 2).to(device) if span_weight > 0 else None
    groups = reader_param_groups(generator.model, lr, encoder_lr)
    if span_head is not None:
        groups.append({"params": list(span_head.parameters()), "lr": lr, "peak_lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    stream = reader_examples(seed)
    held_out = list(itertools.islice(reader_examples(seed + 10_000), eval_examples))
    metrics_path = Path(out_dir + ".metrics.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    start = time.time()
    with metrics_path.open("w") as sink, tqdm(total=steps, desc="reader", unit="step") as bar:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, group["peak_lr"], warmup, steps)
            batch = list(itertools.islice(stream, batch_size))
            loss, parts = reader_loss(generator, batch, span_head, span_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            record = {
                "step": step + 1,
                **parts,
                "lr": optimizer.param_groups[-1]["lr"],
                "elapsed_s": time.time() - start,
            }
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                record["heldout_em"] = reader_exact_match(generator, held_out)
                record["passage_gap_nats"] = passage_reliance(generator, held_out)
                generator.save_pretrained(out_dir)  # keep the latest good state if interrupted
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", em=record.get("heldout_em", history[-1].get("heldout_em", "-"))
            )
            bar.update()
    generator.save_pretrained(out_dir, dtype=save_dtype)
    final = {
        "out_dir": out_dir,
        "steps": steps,
        "final_loss": history[-1]["loss"],
        "heldout_em": history[-1].get("heldout_em"),
        "passage_gap_nats": history[-1].get("passage_gap_nats"),
        "minutes": (time.time() - start) / 60,
    }
    log.info("reader: %s", final)
    return final
