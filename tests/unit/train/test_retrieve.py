"""``raggen retrieve`` writes DPR's retrieval-results JSON and prints DPR's top-k accuracy, equal to
``raggen eval``'s recall@k on the same index; ``raggen eval --out`` writes one prediction per line.
Local files and s3:// (a moto server on loopback) for questions, outputs and checkpoints."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from raggen.cli import main
from raggen.train.qa_scores import has_answer
from raggen.train.retrieve import accuracy_ks
from tests.helpers import publish_encoded_index

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def world_index(tmp_path_factory):
    """A 30-entity world, its passages encoded with MiniLM into a published 2-shard index (no Ray),
    a tiny reader, and the --set lines of a config that names them."""
    from raggen.corpus.readers import read_passages
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.models import TextEncoder, make_tiny_generator

    root = tmp_path_factory.mktemp("retrieve")
    files = write_world(root / "world", WorldConfig(num_entities=30, seed=0))
    enc = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=64)
    psg = read_passages(files.passages_v1)
    xb = publish_encoded_index(psg, str(root / "index"), enc, MINILM, root)
    generator = make_tiny_generator(str(root / "gen"))
    sets = [
        f"world.out_dir={root / 'world'}",
        f"train.index={root / 'index'}",
        f"model.generator={generator}",
        f"model.query_encoder.name_or_path={MINILM}",
        "model.query_encoder.max_length=64",
        "train.estimator=rag-sequence",
        "train.top_k=3",
        "model.max_target_length=6",
    ]
    config = root / "config.yaml"
    config.write_text("# the defaults; the test's --set lines name its world, index and models\nworld: {}\n")
    return {
        "root": root,
        "files": files,
        "passages": psg,
        "xb": xb,
        "encoder": enc,
        "sets": sets,
        "config": str(config),
    }


def _args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def _table(out: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in re.findall(r"^\s+(\d+)\s+([0-9.]+)$", out, flags=re.MULTILINE)}


def _eval(world_index, capsys, *extra: str) -> dict:
    assert main(["eval", world_index["config"], *_args(world_index["sets"]), "--split", "test", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _retrieve(world_index, capsys, *extra: str) -> dict[int, float]:
    assert main(["retrieve", world_index["config"], *_args(world_index["sets"]), *extra]) == 0
    return _table(capsys.readouterr().out)


def check_dpr_results(results, questions, k: int) -> None:
    """DPR's retrieval results format, field for field."""
    assert isinstance(results, list) and len(results) == len(questions)
    for entry, ex in zip(results, questions):
        assert set(entry) == {"question", "answers", "ctxs"}
        assert entry["question"] == ex.question and entry["answers"] == ex.answers
        assert len(entry["ctxs"]) == k
        for ctx in entry["ctxs"]:
            assert set(ctx) == {"id", "title", "text", "score", "has_answer"}
            assert (
                isinstance(ctx["id"], str) and isinstance(ctx["score"], float) and isinstance(ctx["has_answer"], bool)
            )
            assert ctx["has_answer"] == has_answer(ctx["text"], ex.answers)
        scores = [c["score"] for c in entry["ctxs"]]
        assert scores == sorted(scores, reverse=True)


def test_accuracy_ks_are_dprs_capped_at_k():
    assert accuracy_ks(100) == [1, 5, 20, 100]
    assert accuracy_ks(10) == [1, 5, 10] and accuracy_ks(1) == [1] and accuracy_ks(500) == [1, 5, 20, 100]


def test_retrieve_writes_dpr_results_and_its_accuracy_equals_eval_recall(world_index, tmp_path, capsys):
    from raggen.corpus.qa import read_qa

    qa = world_index["files"].test_jsonl
    questions = read_qa(qa)[:12]
    out = tmp_path / "results.json"
    table = _retrieve(world_index, capsys, "--qa", str(qa), "--out", str(out), "-k", "20", "--limit", "12")
    assert sorted(table) == [1, 5, 20]
    results = json.loads(out.read_text())
    check_dpr_results(results, questions, 20)

    # the ranking is exact search with the config's query encoder over every passage
    psg, enc = world_index["passages"], world_index["encoder"]
    xq = enc.encode([q.question for q in questions]).numpy()
    order = np.argsort(-(xq @ world_index["xb"].T), axis=1, kind="stable")
    for entry, row in zip(results, order):
        assert [c["id"] for c in entry["ctxs"]][:5] == psg["id"].iloc[row[:5]].tolist()

    # top-k accuracy: from the file's has_answer flags, as printed, and as `raggen eval` reports it
    from_file = {k: np.mean([any(c["has_answer"] for c in e["ctxs"][:k]) for e in results]) for k in (1, 5, 20)}
    assert table == pytest.approx(from_file, abs=5e-5)
    scores = _eval(world_index, capsys, "--limit", "12")
    assert scores["num_examples"] == 12
    for k in (1, 5, 20):
        assert scores[f"recall@{k}"] == pytest.approx(from_file[k])
    assert 0 < from_file[20] and from_file[1] < 1  # the numbers are not all trivially equal


def test_retrieve_searches_as_the_configs_index_search_says(world_index, tmp_path, capsys):
    """``index.search`` (here an IVF version's nprobe) reaches ``raggen retrieve`` as it reaches
    ``raggen eval``: all 4 lists probed give the exact ranking, one list (FAISS's default) does not."""
    from raggen.corpus.qa import read_qa

    psg, enc = world_index["passages"], world_index["encoder"]
    ivf = tmp_path / "ivf"
    publish_encoded_index(psg, str(ivf), enc, MINILM, tmp_path, factory="IVF4,Flat")
    qa = world_index["files"].test_jsonl
    questions = read_qa(qa)[:12]
    xq = enc.encode([q.question for q in questions]).numpy()
    exact = [psg["id"].iloc[row[:10]].tolist() for row in np.argsort(-(xq @ world_index["xb"].T), axis=1)]

    def top10(nprobe: int) -> list[list[str]]:
        out = tmp_path / f"nprobe{nprobe}.json"
        args = ("--set", f"index.search.nprobe={nprobe}", "--set", f"train.index={ivf}")
        _retrieve(world_index, capsys, *args, "--qa", str(qa), "--out", str(out), "-k", "10", "--limit", "12")
        return [[c["id"] for c in entry["ctxs"]] for entry in json.loads(out.read_text())]

    assert top10(4) == exact
    assert top10(1) != exact


def test_eval_out_writes_one_prediction_per_question(world_index, tmp_path, capsys):
    from raggen.corpus.qa import read_qa

    out = tmp_path / "preds.jsonl"
    scores = _eval(world_index, capsys, "--limit", "5", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = read_qa(world_index["files"].test_jsonl)[:5]
    assert [r["question"] for r in rows] == [q.question for q in questions]
    for r, q in zip(rows, questions):
        assert set(r) == {"id", "question", "answers", "prediction", "em", "f1", "retrieved_ids"}
        assert r["answers"] == q.answers and isinstance(r["prediction"], str) and len(r["retrieved_ids"]) == 3
        assert r["em"] in (0.0, 1.0) and 0.0 <= r["f1"] <= 1.0
    assert np.mean([r["em"] for r in rows]) == pytest.approx(scores["em"])
    assert np.mean([r["f1"] for r in rows]) == pytest.approx(scores["f1"])


def test_retrieve_k_smaller_than_20_and_dpr_csv_questions(world_index, tmp_path, capsys):
    from raggen.corpus.qa import read_qa

    qa = world_index["files"].test_csv  # DPR's question<TAB>['answer'] file
    out = tmp_path / "r.json"
    table = _retrieve(world_index, capsys, "--qa", str(qa), "--out", str(out), "-k", "3")
    results = json.loads(out.read_text())
    check_dpr_results(results, read_qa(qa), 3)
    assert sorted(table) == [1, 3]


@pytest.fixture(scope="module")
def moto(world_index):
    """A moto S3 server on loopback (as tests/integration/conftest.py) with a bucket, credentials in the env."""
    import os

    from moto.server import ThreadedMotoServer

    from raggen.storage import s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    opts = {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}
    s3_client(opts).create_bucket(Bucket="raggen-qa")
    try:
        yield opts
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_s3_questions_outputs_and_checkpoint(world_index, moto, tmp_path, capsys):
    from raggen.storage import read_bytes, upload_dir, write_bytes
    from raggen.train.checkpointing import write_checkpoint

    # a checkpoint whose query_encoder/ is MiniLM (what eval restores) uploaded to S3
    ckpt = write_checkpoint(tmp_path / "final", models={"query_encoder": world_index["encoder"]}, step=1)
    upload_dir(ckpt, "s3://raggen-qa/runs/x/final", moto)
    write_bytes("s3://raggen-qa/data/test.jsonl", world_index["files"].test_jsonl.read_bytes(), moto)
    s3 = [f"train.s3.endpoint_url={moto['endpoint_url']}", "train.s3.region=us-east-1"]
    local = _retrieve(
        world_index,
        capsys,
        "--qa",
        str(world_index["files"].test_jsonl),
        "--out",
        str(tmp_path / "l.json"),
        "-k",
        "5",
        "--limit",
        "6",
    )
    world_index = {**world_index, "sets": world_index["sets"] + s3}
    remote = _retrieve(
        world_index,
        capsys,
        "--qa",
        "s3://raggen-qa/data/test.jsonl",
        "--out",
        "s3://raggen-qa/out/results.json",
        "-k",
        "5",
        "--limit",
        "6",
        "--checkpoint",
        "s3://raggen-qa/runs/x/final",
    )
    assert remote == local
    assert json.loads(read_bytes("s3://raggen-qa/out/results.json", moto)) == json.loads(
        (tmp_path / "l.json").read_text()
    )
    scores = _eval(
        world_index,
        capsys,
        "--limit",
        "4",
        "--checkpoint",
        "s3://raggen-qa/runs/x/final",
        "--out",
        "s3://raggen-qa/out/preds.jsonl",
    )
    rows = read_bytes("s3://raggen-qa/out/preds.jsonl", moto).decode().splitlines()
    assert len(rows) == 4 and scores["checkpoint"] == "s3://raggen-qa/runs/x/final"


def test_eval_qa_scores_a_users_question_file(world_index, capsys):
    """`raggen eval --qa FILE`: the user's own questions instead of a split; the world's test
    questions as DPR's .qa.csv score as the test split does (same questions, same answers)."""
    args = ["eval", world_index["config"], *_args(world_index["sets"]), "--limit", "5"]
    assert main([*args, "--qa", str(world_index["files"].test_csv)]) == 0
    from_csv = json.loads(capsys.readouterr().out)
    by_split = _eval(world_index, capsys, "--limit", "5")
    assert from_csv["qa"] == str(world_index["files"].test_csv) and from_csv["split"] is None
    shared = {"em", "f1", "recall@1", "recall@5", "num_examples", "index_version", "checkpoint"}
    assert shared <= set(from_csv) and {k: from_csv[k] for k in shared} == {k: by_split[k] for k in shared}
    assert "gold_recall@5" in by_split and "gold_recall@5" not in from_csv  # a .qa.csv names no gold passages
    assert main([*args, "--qa", str(world_index["files"].test_csv) + ".missing"]) == 2
    assert "--qa: " in capsys.readouterr().err


def test_retrieve_and_eval_close_the_index_when_the_run_fails(world_index, tmp_path, monkeypatch):
    """A run that fails after the index opened still closes it: with ``mode: actors`` that ends the
    shard actors the run started instead of leaving them to Ray. Here the output cannot be written:
    retrieve fails inside its run (it fails without the ``finally``); eval writes after closing, so
    for eval this checks only that the index is closed once."""
    from raggen.index.sharded import ShardedIndex

    closed: list[str] = []
    original = ShardedIndex.close

    def counting_close(self, *args, **kwargs):
        closed.append(self.version)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardedIndex, "close", counting_close)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    qa = str(world_index["files"].test_jsonl)
    for command in (["retrieve", "--qa", qa, "--limit", "3"], ["eval", "--qa", qa, "--limit", "3"]):
        before = len(closed)
        argv = [command[0], world_index["config"], *_args(world_index["sets"]), *command[1:]]
        assert main([*argv, "--out", str(blocker / "out.json")]) == 2  # one line naming the path
        assert len(closed) == before + 1, f"{command[0]}: the index was not closed"
