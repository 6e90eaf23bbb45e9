"""Index lifecycle on a folder root: list, set-latest (verify first; rollback only when asked),
rm (never LATEST's version; the manifest goes first), and the CLI's one-line refusals (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raggen.cli import main
from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import lifecycle as L
from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.latest import list_versions, read_latest
from raggen.index.loading import verify_version
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version, set_latest
from raggen.storage import open_store
from tests.helpers import three_versions

D = 8


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def test_list_shows_every_version_and_latest(tmp_path):
    root = str(tmp_path / "root")
    assert L.list_index(root) == []
    assert L.format_versions(root, []).endswith("no published versions")
    three_versions(root, tmp_path)
    rows = L.list_index(root)
    assert [r.version for r in rows] == ["v1", "v2", "v3"]
    assert [r.latest for r in rows] == [False, False, True]
    assert [r.num_passages for r in rows] == [30, 40, 50]
    assert rows[0].encoder == "enc-v1" and rows[0].pooling == "cls" and rows[0].dim == D and rows[0].num_shards == 2
    vdir = Path(root, "v2")
    assert rows[1].size_bytes == sum(p.stat().st_size for p in vdir.iterdir())
    table = L.format_versions(root, rows)
    lines = table.splitlines()
    assert lines[0].split() == ["VERSION", "CREATED", "PASSAGES", "SHARDS", "ENCODER", "POOLING", "DIM", "SIZE"]
    assert lines[3].startswith("*") and "v3" in lines[3] and "enc-v3" in lines[3]
    assert lines[-1] == "LATEST -> v3"
    data = json.loads(L.format_versions(root, rows, as_json=True))
    assert data["latest"] == "v3" and [v["version"] for v in data["versions"]] == ["v1", "v2", "v3"]


def test_list_names_an_unreadable_manifest_and_skips_unfinished_uploads(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    Path(root, "v2", "manifest.json").write_text("{not json")
    Path(root, "v9").mkdir()
    Path(root, "v9", "shard-00000.faiss").write_bytes(b"partial")  # no manifest: an unfinished upload
    rows = {r.version: r for r in L.list_index(root)}
    assert set(rows) == {"v1", "v2", "v3"}
    assert rows["v2"].error is not None and "not valid JSON" in rows["v2"].error and rows["v2"].num_passages is None
    assert "unreadable" in L.format_versions(root, list(rows.values()))


def test_set_latest_verifies_and_needs_rollback_to_move_back(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    with pytest.raises(ConfigError, match="rollback"):
        L.set_latest_version(root, "v1")
    assert read_latest(root) == "v3"
    assert L.set_latest_version(root, "v1", rollback=True).version == "v1"
    assert read_latest(root) == "v1"
    assert L.set_latest_version(root, "v2").version == "v2"  # forward needs nothing
    assert read_latest(root) == "v2"


def test_set_latest_refuses_a_version_that_does_not_verify(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    set_latest(root, "v1", rollback=True)
    shard = Path(root, "v2", "shard-00001.parquet")
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")  # one byte changed
    with pytest.raises(IndexIntegrityError, match=r"v2/shard-00001.parquet: sha256 mismatch"):
        L.set_latest_version(root, "v2")
    Path(root, "v3", "shard-00000.faiss").unlink()
    with pytest.raises(IndexIntegrityError, match=r"shard-00000.faiss: missing"):
        L.set_latest_version(root, "v3")
    assert read_latest(root) == "v1"


def test_set_latest_refuses_an_unknown_or_invalid_version(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    with pytest.raises(ConfigError, match=r"'v7' is not published .*versions: v1, v2, v3"):
        L.set_latest_version(root, "v7")
    with pytest.raises(ConfigError, match="version: must match"):
        L.set_latest_version(root, "../v1")
    with pytest.raises(ConfigError, match="is not published"):
        L.set_latest_version(str(tmp_path / "empty"), "v1")
    assert read_latest(root) == "v3"


def test_rm_deletes_only_that_versions_files(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    before = {v: sorted(p.name for p in Path(root, v).iterdir()) for v in ("v1", "v3")}
    removed = L.remove_version(root, "v2")
    assert removed[0] == "manifest.json" and len(removed) == 5
    assert not Path(root, "v2").exists()
    assert list_versions(root) == ["v1", "v3"] and read_latest(root) == "v3"
    assert {v: sorted(p.name for p in Path(root, v).iterdir()) for v in ("v1", "v3")} == before
    verify_version(root, "v1")
    # a file the manifest did not name is somebody else's: it stays (and so does the folder)
    Path(root, "v1", "notes.txt").write_text("mine")
    L.remove_version(root, "v1")
    assert [p.name for p in Path(root, "v1").iterdir()] == ["notes.txt"]
    assert list_versions(root) == ["v3"]


def test_rm_refusals_delete_nothing(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    listing = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match="'v3' is the version LATEST names"):
        L.remove_version(root, "v3")
    with pytest.raises(ConfigError, match="'v4' is not published"):
        L.remove_version(root, "v4")
    with pytest.raises(ConfigError, match="version: must match"):
        L.remove_version(root, "LATEST")
    Path(root, "v1", M.CLAIM_NAME).write_text("{}")  # another writer is (re)publishing v1
    with pytest.raises(ConfigError, match="being published by another writer"):
        L.remove_version(root, "v1")
    Path(root, "v1", M.CLAIM_NAME).unlink()
    after = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())
    assert after == listing


def test_rm_puts_the_manifest_back_when_latest_moves_to_it_meanwhile(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    store = open_store(root)
    real_delete = type(store).delete_file

    def delete_then_move_latest(self, rel):
        real_delete(self, rel)
        if rel == "v2/manifest.json":  # a concurrent set-latest wins the race
            self.write_bytes("LATEST", b"v2\n")

    monkeypatch.setattr(type(store), "delete_file", delete_then_move_latest)
    with pytest.raises(ConfigError, match="became the version LATEST names"):
        L.remove_version(root, "v2")
    monkeypatch.undo()
    assert verify_version(root, "v2").version == "v2"


def test_an_unreadable_manifest_is_removed_alone(tmp_path):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    Path(root, "v1", "manifest.json").write_text("{}")
    assert L.remove_version(root, "v1") == ["manifest.json"]
    assert sorted(p.name for p in Path(root, "v1").iterdir()) == [
        "shard-00000.faiss",
        "shard-00000.parquet",
        "shard-00001.faiss",
        "shard-00001.parquet",
    ]


# ------------------------------------------------------------------------------------------ the CLI


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_cli_list_set_latest_rm(tmp_path, capsys):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    code, out, _ = _cli(capsys, "index", "list", root)
    assert code == 0 and out.splitlines()[-1] == "LATEST -> v3" and len(out.splitlines()) == 5
    code, out, _ = _cli(capsys, "index", "list", root, "--json")
    assert code == 0 and json.loads(out)["latest"] == "v3"
    code, out, _ = _cli(capsys, "index", "set-latest", root, "v1", "--rollback")
    assert code == 0 and "now names v1" in out and read_latest(root) == "v1"
    code, out, _ = _cli(capsys, "index", "set-latest", root, "v3")
    assert code == 0 and read_latest(root) == "v3"
    code, out, _ = _cli(capsys, "index", "rm", root, "v2")
    assert code == 0 and "removed" in out and list_versions(root) == ["v1", "v3"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (("index", "set-latest", "{root}", "v1"), "moving back is a rollback"),
        (("index", "set-latest", "{root}", "v8"), "'v8' is not published"),
        (("index", "set-latest", "{root}", "v2"), "sha256 mismatch"),
        (("index", "rm", "{root}", "v3"), "is the version LATEST names"),
        (("index", "rm", "{root}", "v8"), "'v8' is not published"),
    ],
)
def test_cli_refusals_are_one_line_exit_2(tmp_path, capsys, argv, expected):
    root = str(tmp_path / "root")
    three_versions(root, tmp_path)
    shard = Path(root, "v2", "shard-00000.faiss")
    shard.write_bytes(shard.read_bytes() + b"\0")
    code, _, err = _cli(capsys, *(a.format(root=root) for a in argv))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("raggen: error: ") and expected in err
    assert read_latest(root) == "v3" and list_versions(root) == ["v1", "v2", "v3"]


def test_serve_swap_parses_as_its_own_command():
    from raggen.cli.parser import _aliases, build_parser

    args = build_parser().parse_args(_aliases(["-v", "serve", "swap", "c.yaml", "--version", "v2"]))
    assert args.command == "serve-swap" and args.config == "c.yaml" and args.version == "v2" and not args.latest
    args = build_parser().parse_args(_aliases(["serve", "swap", "c.yaml", "--latest"]))
    assert args.latest and args.version is None
    args = build_parser().parse_args(_aliases(["serve", "c.yaml"]))
    assert args.command == "serve" and args.config == "c.yaml"
    with pytest.raises(SystemExit):
        build_parser().parse_args(_aliases(["serve", "swap", "c.yaml"]))  # one of --version / --latest
    with pytest.raises(SystemExit):
        build_parser().parse_args(_aliases(["serve", "swap", "c.yaml", "--latest", "--version", "v1"]))


def test_serve_swap_without_a_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    import ray

    def no_cluster(*a, **k):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve:\n  index: /nowhere\n")
    code, out, err = _cli(capsys, "serve", "swap", str(cfg), "--latest")
    assert code == 2 and out == "" and "no running Ray cluster" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ index search


def test_index_search_uses_the_manifests_encoder_pooling_and_normalisation(tmp_path, capsys):
    from raggen.models.retriever import TextEncoder
    from raggen.models.tiny import make_tiny_encoder
    from raggen.retrieval.search import search_index

    enc_path = make_tiny_encoder(str(tmp_path / "enc"))
    encoder = TextEncoder.from_pretrained(enc_path, pooling="cls", normalize=True)
    texts = [f"passage number {i} about topic {i * 7 % 11}" for i in range(12)]
    xb = encoder.encode(texts).numpy().astype(np.float32)  # (n, d), unit rows
    ids = np.arange(len(texts), dtype=np.int64)
    out = tmp_path / "build"
    out.mkdir()
    index_name, passages_name = M.shard_file_names(0)
    S.write_index_file(S.build_shard_index(xb, ids), out / index_name)
    write_parquet_atomic(passages_table(ids, [f"p{i}" for i in ids], [""] * len(texts), texts), out / passages_name)
    m = M.make_manifest(
        "v1",
        encoder_name_or_path=enc_path,
        pooling="cls",
        dim=xb.shape[1],
        metric="ip",
        normalize=True,
        faiss_factory="Flat",
        shard_files=[(out / index_name, out / passages_name, len(texts))],
    )
    root = str(tmp_path / "root")
    publish_version(root, m, out)

    result = search_index(root, [texts[5]], k=3)  # nothing told: the manifest's cls + normalize
    assert result.ids[0][0] == "p5" and result.scores[0][0] == pytest.approx(1.0, abs=1e-4)
    other = search_index(root, [texts[5]], k=3, pooling="mean")  # told otherwise: another vector
    assert other.scores[0][0] < 0.9999
    code, out_text, _ = _cli(capsys, "index", "search", root, texts[5], "-k", "2")
    assert code == 0 and out_text.splitlines()[0].startswith(" 1. [1.000] p5 ")
    # --query-prefix: another query text (the prompt before it), so no longer the passage's own vector
    code, out_text, _ = _cli(capsys, "index", "search", root, texts[5], "-k", "2", "--query-prefix", "search: ")
    prompted = search_index(root, [texts[5]], k=3, query_prefix="search: ")
    want = (encoder.encode(["search: " + texts[5]], prefix="").numpy() @ xb.T)[0]  # (n,): the prompted question's
    rows = [int(i[1:]) for i in prompted.ids[0]]
    np.testing.assert_allclose(prompted.scores[0], want[rows], rtol=0, atol=1e-6)
    assert not np.allclose(
        prompted.scores[0], result.scores[0], rtol=0, atol=1e-6
    )  # (a tiny model: cls states are close)
    assert code == 0 and out_text.splitlines()[0].startswith(f" 1. [{prompted.scores[0][0]:.3f}] {prompted.ids[0][0]} ")
