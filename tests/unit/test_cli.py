"""Every CLI failure a user can act on is one line on stderr naming the cause, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from raggen.cli import failure_message, main
from raggen.errors import ConfigError
from tests.helpers import REPO


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_a_bad_k_names_the_flag(capsys):
    code, line = _run(capsys, "index", "search", "/nowhere", "q", "-k", "0")
    assert code == 2 and "argument -k: must be >= 1, got 0" in line


def test_a_config_path_that_is_a_folder(capsys):
    code, line = _run(capsys, "train", str(REPO / "configs"))
    assert code == 2 and line == f"raggen: error: {REPO / 'configs'}: is a folder, expected a YAML config file"


def test_a_missing_index(capsys, tmp_path):
    code, line = _run(capsys, "index", "verify", str(tmp_path / "none"))
    assert code == 2 and line.startswith("raggen: error: ") and "LATEST" in line


def test_a_config_given_where_an_index_goes_is_named_with_the_index_it_builds(capsys, tmp_path):
    """`raggen index search CONFIG q` (the other commands take a config first) said only
    "Not a directory: 'CONFIG/LATEST'"; every index command now names the mistake and the fix."""
    config = tmp_path / "mine.yaml"
    config.write_text("index:\n  output: /data/my-index\n")
    code, line = _run(capsys, "index", "search", str(config), "a question")
    assert code == 2 and f"argument uri: {config} is a file, not an index" in line
    assert f"pass it as --config {config} and give /data/my-index as the uri" in line
    other = tmp_path / "notes.txt"
    other.write_text("x")
    for command in (["verify"], ["list"], ["rm"], ["set-latest"]):
        argv = ["index", *command, str(other)] + (["v1"] if command[0] in ("rm", "set-latest") else [])
        code, line = _run(capsys, *argv)
        assert code == 2 and f"argument uri: {other} is a file, not an index" in line and "--config" not in line


def test_a_bad_faiss_factory_fails_before_any_encoding(capsys, tmp_path):
    passages = tmp_path / "p.tsv"
    passages.write_text("id\ttext\ttitle\n1\tsome text\tT\n")
    code, line = _run(
        capsys,
        "index",
        "build",
        str(REPO / "configs" / "quickstart.yaml"),
        "--set",
        f"index.passages={passages}",
        "--set",
        f"index.output={tmp_path / 'out'}",
        "--set",
        "index.faiss_factory=IVFbogus",
    )
    assert code == 2 and "faiss_factory" in line and "IVFbogus" in line
    assert not (tmp_path / "out").exists()


def test_an_existing_version_fails_before_any_encoding(capsys, tmp_path):
    (tmp_path / "out" / "v1").mkdir(parents=True)
    (tmp_path / "out" / "v1" / "manifest.json").write_text("{}")
    code, line = _run(
        capsys,
        "index",
        "build",
        str(REPO / "configs" / "quickstart.yaml"),
        "--set",
        f"index.output={tmp_path / 'out'}",
        "--set",
        "index.version=v1",
    )
    assert code == 2 and "'v1' is already published" in line


def test_s3_credential_and_endpoint_errors_are_one_line():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert failure_message(NoCredentialsError()) == "S3: Unable to locate credentials"
    assert failure_message(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")).startswith(
        "S3: Could not connect"
    )


def test_an_error_raised_inside_a_ray_worker_is_unwrapped_from_its_traceback_text():
    wrapped = RuntimeError(
        "Training failed due to worker errors:\nTraceback...\n"
        "raggen.errors.ConfigError: train.index: s3://b/x: cannot read its manifest\n"
    )
    assert failure_message(wrapped) == "train.index: s3://b/x: cannot read its manifest"
    assert failure_message(ConfigError("x: y")) == "x: y"


def test_a_bug_keeps_its_traceback():
    assert failure_message(KeyError("oops")) is None


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raggen.cli", "index", "verify", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("raggen: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr


def test_hub_ids_and_paths_that_cannot_be_one():
    from raggen.models.loading import could_be_hub_id

    for name in ("gpt2", "facebook/bart-large", "sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-base-en-v1.5"):
        assert could_be_hub_id(name), name
    for name in ("raggen/assets/reader", "./reader", "../models/reader", "/abs/reader", "a/../b", "runs/x/final/", ""):
        assert not could_be_hub_id(name), name


def test_a_repo_relative_reader_typed_in_another_folder_is_refused_before_ray_starts(capsys, tmp_path, monkeypatch):
    """The shipped configs name `raggen/assets/reader` relative to the repo: from any other folder it
    is neither a folder nor a Hub id, and `raggen serve` / `train` / `eval` / `retrieve` say so, naming
    the field, instead of a replica or Train worker failing after Ray has started."""
    import ray

    had_ray = ray.is_initialized()  # another test of this process may have started one
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart.yaml")
    for argv in (("serve", config), ("train", config), ("eval", config)):
        code, line = _run(capsys, *argv)
        assert code == 2 and line.startswith("raggen: error: model.generator: 'raggen/assets/reader'"), (argv, line)
        assert str(tmp_path) in line and "Hugging Face id" in line
    # `raggen retrieve` loads only the query encoder: a run's relative export typed in the wrong folder
    (tmp_path / "mine.qa.csv").write_text("who keeps the lighthouse?\t['Ada']\n")
    argv = ("retrieve", config, "--qa", "mine.qa.csv", "--out", "r.json",
            "--set", "model.query_encoder.name_or_path=runs/x/final/query_encoder")  # fmt: skip
    code, line = _run(capsys, *argv)
    assert code == 2 and line.startswith("raggen: error: model.query_encoder.name_or_path: 'runs/x/final/"), line
    assert ray.is_initialized() == had_ray, "the refusal came after Ray started"
    monkeypatch.chdir(REPO)  # where the path is a folder: no complaint (the check only, no serving here)
    from raggen.app.serving import app_args_from_config, check_served_models
    from raggen.cli.config_args import config_from_args

    check_served_models(app_args_from_config(config_from_args(SimpleNamespace(config=config, set=[]))))


def test_dry_run_set_lines_paste_into_a_shell_as_they_are():
    import shlex

    from raggen.cli.rehearsal import set_lines

    overrides = ["index.faiss_factory=IVF8,PQ64,Refine(SQfp16)", "train.steps=2", "index.passages=/tmp/a b/p.tsv"]
    lines = set_lines(overrides)
    assert lines[1] == "--set train.steps=2"  # plain values stay as they were printed before
    assert [shlex.split(line) for line in lines] == [["--set", o] for o in overrides]
    run = subprocess.run(["bash", "-n", "-c", "echo " + " ".join(lines)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # the parentheses no longer break the command line
