"""Retrieval modes: answer recall@5 / @20 of dense, sparse (BM25) and hybrid (RRF, weighted) retrieval.

    .venv/bin/python benchmarks/retrieval_modes.py                   # world of 400 entities + real text
    .venv/bin/python benchmarks/retrieval_modes.py --entities 100    # quicker

Two corpora, each published once with ``build_index`` and ``IndexBuildSettings(sparse="bm25")`` (MiniLM, Ray, 2 shards):
- the generated world (``raggen.corpus.world``, passages v1) with its test questions;
- real English text on this machine: the Python language reference that ships with Python
  (``pydoc_data.topics``) and the licence texts under /usr/share/common-licenses, cut into
  100-word passages, with the hand-written questions of ``benchmarks/data/real_text_qa.tsv``.
  Questions whose answer occurs in no passage, or in more than ``--max-answer-share`` of them
  (too generic to say anything about retrieval), are set aside; the table says how many were kept.

Recall@k is DPR's answer recall (``raggen.train.evaluate.answer_hits``, as ``raggen eval``), the
same questions and index for every mode; the baseline is dense retrieval in the same run (ratio
columns). "hybrid tuned" picks ``retrieval.fusion`` and ``retrieval.dense_weight`` on held-out
questions (2-fold cross-validation: each question is scored with the setting that did best on the
other fold; the row names the choice per fold), as a user would tune them on their own dev set.
Claim: hybrid >= the better of dense and sparse.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]

from _common import format_table, machine  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LICENSES = Path("/usr/share/common-licenses")
QA_FILE = ROOT / "benchmarks" / "data" / "real_text_qa.tsv"
KS = (5, 20)
PASSAGE_TOKENS = 256


def real_text_passages(words_per_passage: int = 100) -> list[tuple[str, str, str]]:
    """(id, title, text): the Python reference topics and the licence texts, 100-word passages."""
    from pydoc_data.topics import topics

    docs = [(f"python:{name}", name, text) for name, text in sorted(topics.items())]
    seen = set()
    for path in sorted(LICENSES.iterdir()) if LICENSES.is_dir() else []:
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs.append((f"license:{path.name}", path.name, real.read_text(errors="replace")))
    out = []
    for doc_id, title, text in docs:
        words = text.split()
        for start in range(0, len(words), words_per_passage):
            out.append((f"{doc_id}#{start}", title, " ".join(words[start : start + words_per_passage])))
    return out


def write_passages_tsv(rows: list[tuple[str, str, str]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(["id", "text", "title"])
        for pid, title, text in rows:
            w.writerow([pid, text.replace("\t", " "), title])
    return path


def real_text_questions(passages: list[str], max_share: float) -> tuple[list[tuple[str, list[str]]], int]:
    """The hand-written questions whose answers occur in 1..max_share of the passages; (kept, total)."""
    from raggen.train.evaluate import has_answer

    rows = list(csv.DictReader(open(QA_FILE, encoding="utf-8"), delimiter="\t"))
    kept = []
    for row in rows:
        answers = [a.strip() for a in row["answers"].split("|") if a.strip()]
        n = sum(has_answer(p, answers) for p in passages)
        if 1 <= n <= max_share * len(passages):
            kept.append((row["question"], answers))
    return kept, len(rows)


def question_hits(index, encoder, questions: list[str], answers: list[list[str]], settings) -> tuple[list, float]:
    """Per question, DPR's has_answer of each of the top max(KS) hits; and ms per query."""
    from raggen.retrieval.search import encode_and_search
    from raggen.train.evaluate import answer_hits

    hits, start = [], time.perf_counter()
    for i in range(0, len(questions), 64):
        qs = questions[i : i + 64]
        res = encode_and_search(encoder, index, qs, max(KS), mode=settings.mode, settings=settings)
        hits += answer_hits(res.texts, answers[i : i + 64])
    return hits, (time.perf_counter() - start) * 1000 / max(1, len(questions))


def recall(hits: list) -> dict[str, float]:
    from raggen.train.evaluate import recall_at_k

    return {f"r@{k}": v for k, v in recall_at_k(hits, KS).items()}


def _summed_recall(hits: list) -> float:
    r = recall(hits)
    return r["r@5"] + r["r@20"]


def cross_validated(per_setting: dict[str, list], folds: int = 2) -> tuple[list, list[str]]:
    """Each question scored with the fusion setting that did best (mean of recall@5 and @20) on the
    OTHER folds' questions: a tuned hybrid whose numbers never saw the questions they are measured on.
    Returns the hits and the setting chosen for each fold."""
    n = len(next(iter(per_setting.values())))
    fold_of = [i % folds for i in range(n)]
    out: list = [None] * n
    chosen = []
    for f in range(folds):
        train = [i for i in range(n) if fold_of[i] != f]

        best = max(per_setting, key=lambda name, rows=train: _summed_recall([per_setting[name][i] for i in rows]))
        chosen.append(best)
        for i in range(n):
            if fold_of[i] == f:
                out[i] = per_setting[best][i]
    return out, chosen


def run_corpus(name: str, passages_tsv: Path, qa: list[tuple[str, list[str]]], out: Path, note: str) -> list[list[str]]:
    from raggen.index import IndexBuildSettings, SearchSettings, build_index, open_index
    from raggen.models.retriever import EncoderSpec, TextEncoder
    from raggen.retrieval import RetrievalSettings, with_retrieval

    root = str(out / f"index-{name}")
    t = time.perf_counter()
    manifest = build_index(
        str(passages_tsv),
        root,
        # 256 tokens, as configs/documents.yaml: a 100-word passage of technical English is 130-200
        # MiniLM tokens, and at 128 the dense side never sees the end of many passages
        encoder=EncoderSpec(name_or_path=MINILM, max_length=PASSAGE_TOKENS, normalize=True),
        settings=IndexBuildSettings(num_shards=2, num_actors=1, actor_num_cpus=0.5, actor_num_gpus=None, sparse="bm25"),
        search=SearchSettings(target_recall=None),
        version="v1",
        work_dir=out / f"work-{name}",
    )
    build_s = time.perf_counter() - t
    enc = manifest.encoder
    encoder = TextEncoder.from_pretrained(enc.name_or_path, pooling=enc.pooling, max_length=64, normalize=enc.normalize)
    index = with_retrieval(open_index(root, load_embeddings=False), root, RetrievalSettings(), load_sparse_index=True)
    questions, answers = [q for q, _ in qa], [a for _, a in qa]
    modes = [
        ("dense", RetrievalSettings(mode="dense")),
        ("sparse (BM25)", RetrievalSettings(mode="sparse")),
        ("hybrid rrf", RetrievalSettings(mode="hybrid", fusion="rrf")),
        ("hybrid weighted (default)", RetrievalSettings(mode="hybrid", fusion="weighted")),
    ]
    results = {}
    for label, settings in modes:
        hits, ms = question_hits(index, encoder, questions, answers, settings)
        results[label] = {**recall(hits), "ms": ms}
    # retrieval.fusion and dense_weight tuned on held-out questions (2-fold cross-validation)
    grid = {
        f"{fusion} w={w:.1f}": RetrievalSettings(mode="hybrid", fusion=fusion, dense_weight=w)
        for fusion in ("weighted", "rrf")
        for w in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    }
    per_setting, total_ms = {}, 0.0
    for label, settings in grid.items():
        per_setting[label], ms = question_hits(index, encoder, questions, answers, settings)
        total_ms += ms
    tuned, chosen = cross_validated(per_setting)
    results[f"hybrid tuned ({' / '.join(chosen)})"] = {**recall(tuned), "ms": total_ms / len(grid)}
    index.close()
    base = results["dense"]
    rows = []
    for label, r in results.items():
        rows.append(
            [
                name if label == "dense" else "",
                f"{len(qa)}{note}" if label == "dense" else "",
                label,
                f"{r['r@5']:.3f}",
                f"{r['r@20']:.3f}",
                f"{r['r@5'] / max(base['r@5'], 1e-9):.2f}x",
                f"{r['r@20'] / max(base['r@20'], 1e-9):.2f}x",
                f"{r['ms']:.1f}",
            ]
        )
    print(f"{name}: {manifest.num_passages} passages, built (encode + FAISS + BM25, Ray) in {build_s:.0f}s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=400, help="generated world size")
    p.add_argument("--world-questions", type=int, default=400, help="first N test questions of the world")
    p.add_argument(
        "--max-answer-share",
        type=float,
        default=0.02,
        help="real text: drop questions whose answer is in more than this share of the passages",
    )
    args = p.parse_args()

    import ray

    from raggen.corpus.qa import read_qa
    from raggen.corpus.world import WorldConfig, write_world

    print(f"machine: {machine()}", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raggen-bench-modes-") as tmp:
        out = Path(tmp)
        files = write_world(out / "world", WorldConfig(num_entities=args.entities, seed=0))
        world_qa = [(ex.question, list(ex.answers)) for ex in read_qa(files.test_jsonl)][: args.world_questions]
        rows += run_corpus("generated world", files.passages_v1, world_qa, out, "")
        passages = real_text_passages()
        kept, total = real_text_questions([t for _, _, t in passages], args.max_answer_share)
        tsv = write_passages_tsv(passages, out / "real_text.tsv")
        rows += run_corpus("real text (Python ref + licences)", tsv, kept, out, f" of {total}")
    ray.shutdown()
    print()
    print(
        format_table(
            ["corpus", "questions", "retrieval", "recall@5", "recall@20", "@5 vs dense", "@20 vs dense", "ms/query"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
