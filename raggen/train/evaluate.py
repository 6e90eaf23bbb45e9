"""Open-domain QA evaluation: EM/F1 of generated answers and retrieval recall of the index.

EM and F1 use the SQuAD normalisation (lower case, drop punctuation and the articles a/an/the,
collapse whitespace) and take the best score over the reference answers. Retrieval recall@k is
DPR's "top-k accuracy": an example counts when some answer's token sequence occurs in one of its
top-k passages (DPR tokenises into words and punctuation, uncased, after NFD normalisation).
Where a QA file names gold passage ids, gold recall@k is reported too.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raggen.names import DECODINGS
from raggen.train.qa_scores import (  # noqa: F401 - the scores, importable from here as before
    answer_hits,
    dpr_tokens,
    exact_match,
    f1_score,
    gold_hits,
    has_answer,
    normalize_answer,
    recall_at_k,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# End-to-end evaluation: retrieve -> (rerank) -> generate -> score
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(
    generator,
    questions: list[str],
    passages: list[list[str]],
    doc_logprobs: torch.Tensor,
    *,
    decoding: str = "rag-token",
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    fid: bool = False,
) -> list[str]:
    """Answers through ``raggen.decoding``: RAG-Token beam search, RAG-Sequence fast or thorough
    decoding over the K passages (``doc_logprobs`` (b, k) = log p(z|x)), or with ``fid=True`` one
    Fusion-in-Decoder row per question reading all its passages at once."""
    from raggen import decoding as dec

    if decoding not in DECODINGS:
        raise ValueError(f"decoding: expected one of {DECODINGS}, got {decoding!r}")
    max_new_tokens = max_new_tokens or generator.max_target_length
    if fid:
        encoded = generator.fid_encode(questions, passages)
        out = dec.rag_token_generate(generator.step_fn(encoded), torch.zeros(len(questions), 1, device=generator.device),
                                     bos_id=generator.bos_id, eos_id=generator.eos_id, pad_id=generator.pad_id,
                                     max_new_tokens=max_new_tokens, num_beams=num_beams)  # fmt: skip
        return [generator.decode(tokens) for tokens in out.best_tokens]
    tokens = dec.generate_tokens(
        generator,
        questions,
        passages,
        doc_logprobs,
        decoding=decoding,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )  # the dispatcher Serve uses
    return [generator.decode(t) for t in tokens]


@dataclass
class RetrievalBatch:
    ids: list[list[str]]
    texts: list[list[str]]  # passage text alone (DPR's has_answer reads the text, not the title)
    passages: list[list[str]]  # title + text, what readers see
    scores: torch.Tensor  # (b, depth) retriever (or reranker) scores, best first
    titles: list[list[str]] | None = None  # passage titles (DPR's retrieval results list them)


def retrieve_for_eval(query_encoder, index, questions: list[str], depth: int, reranker=None) -> RetrievalBatch:
    """Top-``depth`` passages per question; with a reranker, those candidates re-sorted by it."""
    from raggen.retrieval.search import encode_and_search, reader_passages

    # a HybridIndex searches by its mode (dense | sparse | hybrid), with the questions' text
    res = encode_and_search(query_encoder, index, list(questions), depth)
    ids, texts, titles = [list(r) for r in res.ids], [list(r) for r in res.texts], [list(r) for r in res.titles]
    passages = reader_passages(res)
    scores = torch.as_tensor(res.scores, dtype=torch.float32)  # (b, depth)
    if reranker is not None:
        scores = reranker.score(list(questions), passages).float()  # (b, depth)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        scores = scores.gather(1, order)
        pick = order.tolist()
        ids = [[row[j] for j in o] for row, o in zip(ids, pick)]
        texts = [[row[j] for j in o] for row, o in zip(texts, pick)]
        passages = [[row[j] for j in o] for row, o in zip(passages, pick)]
        titles = [[row[j] for j in o] for row, o in zip(titles, pick)]
    return RetrievalBatch(ids, texts, passages, scores, titles)


def evaluate_rag(
    examples: Sequence,
    *,
    query_encoder,
    generator,
    index,
    top_k: int = 5,
    decoding: str = "rag-token",
    ks: Sequence[int] = (1, 5, 20),
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    reranker=None,
    rerank_candidates: int | None = None,
    generate: bool = True,
    progress: Callable[[int], None] | None = None,
    records: list | None = None,
) -> dict[str, float]:
    """EM/F1 of generated answers and answer (and gold-passage) recall@k over ``examples``
    (objects with question, answers, gold_passage_ids); with ``records`` (a list), one dict per
    example is appended to it: question, answers, prediction, em, f1 and the retrieved ids the
    reader read.

    The reader sees the top ``top_k`` passages; recall is measured to depth max(ks). With a
    reranker (G-Rerank), ``rerank_candidates`` passages are retrieved, re-sorted by the reranker,
    and its top ``top_k`` are read Fusion-in-Decoder style (the hard top-k mask).
    """
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    depth = max(max(ks), top_k, rerank_candidates or 0)
    em, f1, hits, golds = [], [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        questions = [ex.question for ex in chunk]
        got = retrieve_for_eval(query_encoder, index, questions, rerank_candidates or depth, reranker)
        hits += answer_hits(got.texts, [ex.answers for ex in chunk])
        golds += [(ids, ex.gold_passage_ids) for ids, ex in zip(got.ids, chunk) if ex.gold_passage_ids]
        if generate:
            answers = generate_answers(
                generator,
                questions,
                [p[:top_k] for p in got.passages],
                torch.log_softmax(got.scores[:, :top_k], dim=-1),
                decoding=decoding,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                fid=reranker is not None,
            )
            em += [exact_match(a, ex.answers) for a, ex in zip(answers, chunk)]
            f1 += [f1_score(a, ex.answers) for a, ex in zip(answers, chunk)]
            if records is not None:
                records += [
                    {
                        "id": ex.id,
                        "question": ex.question,
                        "answers": list(ex.answers),
                        "prediction": a,
                        "em": e,
                        "f1": f,
                        "retrieved_ids": ids[:top_k],
                    }
                    for ex, a, e, f, ids in zip(chunk, answers, em[-len(chunk) :], f1[-len(chunk) :], got.ids)
                ]
        if progress:
            progress(len(chunk))
    out: dict[str, float] = {"num_examples": float(len(examples))}
    if generate:
        out.update(em=sum(em) / len(em), f1=sum(f1) / len(f1))
    out.update({f"recall@{k}": v for k, v in recall_at_k(hits, ks).items()})
    if golds:
        gh = gold_hits([g[0] for g in golds], [g[1] for g in golds])
        out.update({f"gold_recall@{k}": v for k, v in recall_at_k(gh, ks).items()})
    return out


def split_examples(
    split: str,
    *,
    dev_file: str,
    world_dir: str,
    qa_file: str | None = None,
    limit: int | None = None,
    s3_options=None,
) -> list:
    """QA examples of a split: ``dev`` is train.dev_file, ``test`` the world's test.jsonl, and
    ``changed`` the world's v2-changed facts with their *new* answers (to score after a swap);
    ``qa_file`` (a QA file of the user's) replaces the split."""
    import os

    from raggen.corpus.qa import QAExample, read_qa
    from raggen.errors import ConfigError
    from raggen.storage import is_s3_uri

    if qa_file is not None:
        if not is_s3_uri(qa_file) and not os.path.exists(qa_file):
            raise ConfigError(f"--qa: {qa_file}: no such file")
        examples = read_qa(qa_file, s3_options=s3_options)
        return examples[:limit] if limit else examples
    if split == "dev":
        path = dev_file
    elif split in ("test", "changed"):
        path = os.path.join(world_dir, "test.jsonl" if split == "test" else "changed_v2.jsonl")
    else:
        raise ConfigError(f"split: expected dev, test or changed, got {split!r}")
    if not is_s3_uri(path) and not os.path.exists(path):
        raise ConfigError(
            f"split {split}: {path}: no such file (run `raggen world` first, or pass --qa FILE: your own questions)"
        )
    if split == "changed":
        from raggen.corpus.world import read_changed_facts

        examples = [
            QAExample(c.id, c.question, list(c.answers_v2), list(c.gold_passage_ids)) for c in read_changed_facts(path)
        ]
    else:
        examples = read_qa(path, s3_options=s3_options)
    return examples[:limit] if limit else examples


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | None, s3: dict | None):
    """A checkpoint folder to read: a local one as it is, an ``s3://`` one downloaded for the duration."""
    from raggen.storage import download, is_s3_uri

    if checkpoint is None or not is_s3_uri(checkpoint):
        yield checkpoint
        return
    from raggen.models.exports import resolve_export

    with tempfile.TemporaryDirectory(prefix="raggen-checkpoint-") as tmp:
        download(resolve_export(checkpoint, s3, verify=False), tmp, s3)  # an export: only LATEST's, verified on reading
        yield tmp


def progress_bar(total: int, desc: str):
    """A tqdm bar over questions on stderr: live on a terminal; in a log file (``ray job logs``, CI)
    it still appears, refreshed at most every 30 s so the log stays short."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="q",
        file=sys.stderr,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
        ascii=not tty,
    )
