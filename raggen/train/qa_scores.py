"""Open-domain QA scores: EM/F1 of answers (SQuAD v1.1 normalisation: lower case, drop punctuation
and the articles a/an/the, collapse whitespace; the best score over the reference answers) and
retrieval recall@k, DPR's "top-k accuracy" (an example counts when some answer's token sequence
occurs in one of its top-k passages; DPR tokenises into words and punctuation, uncased, after NFD
normalisation), plus gold-passage recall where a QA file names gold ids. Pure functions."""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------
# Answer metrics (SQuAD v1.1 evaluation script semantics)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised answer, else 0.0."""
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1_one(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD 2.0 convention: both empty is a match, one empty is not.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 after normalisation, best over the reference answers."""
    _check_answers(answers)
    return max(_f1_one(prediction, a) for a in answers)


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers: expected a non-empty list of strings, got {answers!r}")


# ---------------------------------------------------------------------------------------------
# Retrieval metrics (DPR's has_answer, string mode)
# ---------------------------------------------------------------------------------------------

_DPR_TOKEN = re.compile(r"[\w]+|[^\w\s]", re.UNICODE)


def dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer, uncased: runs of word characters and single non-space symbols."""
    text = unicodedata.normalize("NFD", text)
    return [t.lower() for t in _DPR_TOKEN.findall(text)]


def has_answer(passage: str, answers: Sequence[str]) -> bool:
    """True when some answer's token sequence occurs contiguously in the passage's tokens."""
    tokens = dpr_tokens(passage)
    for answer in answers:
        ans = dpr_tokens(answer)
        if not ans:
            continue
        n = len(ans)
        if any(tokens[i : i + n] == ans for i in range(len(tokens) - n + 1)):
            return True
    return False


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Fraction of examples with a hit among their first k ranks. hits: (n, depth) booleans.

    A k larger than an example's list counts the whole list (as DPR does for short lists).
    """
    if not hits:
        raise ValueError("hits: no examples to score")
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"ks: recall@k needs k >= 1, got {k}")
        out[k] = sum(any(row[:k]) for row in hits) / len(hits)
    return out


def answer_hits(passages: Sequence[Sequence[str]], answers: Sequence[Sequence[str]]) -> list[list[bool]]:
    """hits[i][r]: does the r-th retrieved passage of example i contain one of its answers."""
    if len(passages) != len(answers):
        raise ValueError(f"passages has {len(passages)} rows but answers has {len(answers)}")
    return [[has_answer(p, ans) for p in row] for row, ans in zip(passages, answers)]


def gold_hits(ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]]) -> list[list[bool]]:
    """hits[i][r]: is the r-th retrieved id of example i one of its gold passage ids."""
    if len(ids) != len(gold_ids):
        raise ValueError(f"ids has {len(ids)} rows but gold_ids has {len(gold_ids)}")
    return [[str(p) in {str(g) for g in gold} for p in row] for row, gold in zip(ids, gold_ids)]
