"""Evaluation metrics (EM/F1/recall), the metrics JSONL + plot, checkpoint folders, and the pure
helpers of the training step (candidate union, visited columns, batch schedule)."""

from __future__ import annotations

import random

import pytest
import torch

from raggen.train.evaluate import (
    answer_hits,
    dpr_tokens,
    exact_match,
    f1_score,
    gold_hits,
    has_answer,
    normalize_answer,
    recall_at_k,
)
from tests.helpers import publish_encoded_index

# ----------------------------------------------------------------------------------- EM / F1


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    # articles only as whole words: "theory" keeps its "the"
    assert normalize_answer("theory of the anthem") == "theory of anthem"


def test_exact_match_takes_the_best_reference():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def _reference_f1(pred: str, gold: str) -> float:
    """F1 from the definition: multiset overlap of normalised tokens."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    overlap = sum(min(p.count(t), g.count(t)) for t in set(p))
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize(
    "pred,answers",
    [
        ("the cat sat", ["cat sat on the mat"]),
        ("cat cat dog", ["cat dog dog", "bird"]),
        ("Paris, France", ["paris", "France"]),
        ("nothing shared", ["entirely different"]),
    ],
)
def test_f1_matches_the_definition(pred, answers):
    assert f1_score(pred, answers) == pytest.approx(max(_reference_f1(pred, a) for a in answers))


def test_f1_and_em_of_empty_prediction():
    assert f1_score("", ["x"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty: SQuAD 2.0 counts a match
    assert exact_match("", ["a"]) == 1.0


def test_answers_must_be_a_nonempty_list():
    with pytest.raises(ValueError, match="answers"):
        exact_match("x", [])
    with pytest.raises(ValueError, match="answers"):
        f1_score("x", "x")


# ----------------------------------------------------------------------------------- recall


def test_has_answer_matches_whole_tokens_only():
    passage = "The category of cats includes the lion (Panthera leo)."
    assert has_answer(passage, ["lion"])
    assert has_answer(passage, ["panthera LEO"])
    assert not has_answer(passage, ["cat"])  # only "cats" and "category" are there
    assert has_answer("born in 1879 .", ["1879"])
    assert not has_answer("born in 18790", ["1879"])


def test_has_answer_is_unicode_normalised():
    composed, decomposed = "caf\u00e9 society", "cafe\u0301"
    assert has_answer(composed, [decomposed])
    assert dpr_tokens("Hello, World") == ["hello", ",", "world"]


def test_recall_at_k_against_enumeration():
    rng = random.Random(0)
    hits = [[rng.random() < 0.2 for _ in range(6)] for _ in range(40)]
    got = recall_at_k(hits, [1, 3, 6, 10])
    for k in (1, 3, 6, 10):
        expected = sum(1 for row in hits if True in row[:k]) / len(hits)
        assert got[k] == pytest.approx(expected)
    assert got[1] <= got[3] <= got[6] == got[10]


def test_answer_and_gold_hits():
    passages = [["a red fox", "blue sky"], ["green grass", "yellow sun"]]
    assert answer_hits(passages, [["sky"], ["moon"]]) == [[False, True], [False, False]]
    assert gold_hits([["1", "7"], [3, 4]], [["7"], ["4", "9"]]) == [[False, True], [False, True]]
    with pytest.raises(ValueError, match="rows"):
        answer_hits(passages, [["x"]])
    with pytest.raises(ValueError, match="k >= 1"):
        recall_at_k([[True]], [0])


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_rag(tmp_path_factory):
    """A tiny encoder + reader and a published 2-shard index over a 30-entity world."""

    from raggen.corpus.world import WorldConfig, build_world
    from raggen.index import open_index
    from raggen.models import Generator, TextEncoder, make_tiny_encoder, make_tiny_generator

    root = tmp_path_factory.mktemp("eval")
    world = build_world(WorldConfig(num_entities=30, seed=0))
    enc = TextEncoder.from_pretrained(make_tiny_encoder(str(root / "enc")), max_length=64)
    gen = Generator.from_pretrained(make_tiny_generator(str(root / "gen")), max_source_length=96, max_target_length=6)
    psg = world.passages_v1
    xb = publish_encoded_index(psg, str(root / "index"), enc, str(root / "enc"), root)
    enc.eval()
    gen.eval()
    return {"enc": enc, "gen": gen, "index": open_index(str(root / "index")), "xb": xb, "passages": psg, "world": world}


def test_decodings_agree_when_there_is_one_passage(tiny_rag):
    from raggen.train.evaluate import generate_answers

    questions = [ex.question for ex in tiny_rag["world"].test[:3]]
    passages = [[t] for t in tiny_rag["passages"]["text"][:3]]
    doc_lp = torch.zeros(3, 1)
    outs = {
        d: generate_answers(tiny_rag["gen"], questions, passages, doc_lp, decoding=d)
        for d in ("rag-token", "rag-sequence-fast", "rag-sequence-thorough")
    }
    outs["fid"] = generate_answers(tiny_rag["gen"], questions, passages, doc_lp, fid=True)
    assert len({tuple(v) for v in outs.values()}) == 1, outs
    with pytest.raises(ValueError, match="decoding"):
        generate_answers(tiny_rag["gen"], questions, passages, doc_lp, decoding="beam")


def test_evaluate_rag_recall_matches_exact_search_and_em_scores_the_answers(tiny_rag):
    import numpy as np

    from raggen.corpus.qa import QAExample
    from raggen.train.evaluate import evaluate_rag, generate_answers, retrieve_for_eval

    examples = tiny_rag["world"].test[:6]
    enc, gen, index, psg = tiny_rag["enc"], tiny_rag["gen"], tiny_rag["index"], tiny_rag["passages"]
    got = evaluate_rag(examples, query_encoder=enc, generator=gen, index=index, top_k=3, ks=(1, 5), batch_size=4)

    xq = enc.encode([ex.question for ex in examples]).numpy()
    order = np.argsort(-(xq @ tiny_rag["xb"].T), axis=1, kind="stable")  # exact search over every passage
    for k in (1, 5):
        answer = np.mean(
            [any(has_answer(psg["text"].iloc[j], ex.answers) for j in row[:k]) for row, ex in zip(order, examples)]
        )
        gold = np.mean(
            [any(psg["id"].iloc[j] in ex.gold_passage_ids for j in row[:k]) for row, ex in zip(order, examples)]
        )
        assert got[f"recall@{k}"] == pytest.approx(answer)
        assert got[f"gold_recall@{k}"] == pytest.approx(gold)

    # answers set to the reader's own outputs on the same top-3 must score EM = F1 = 1
    top = retrieve_for_eval(enc, index, [ex.question for ex in examples], 5)
    preds = generate_answers(
        gen, [ex.question for ex in examples], [p[:3] for p in top.passages], torch.log_softmax(top.scores[:, :3], -1)
    )
    own = [QAExample(ex.id, ex.question, [p, "something else"], ex.gold_passage_ids) for ex, p in zip(examples, preds)]
    scored = evaluate_rag(own, query_encoder=enc, generator=gen, index=index, top_k=3, ks=(1, 5), batch_size=4)
    assert scored["em"] == 1.0 and scored["f1"] == 1.0
    assert scored["num_examples"] == len(examples)
