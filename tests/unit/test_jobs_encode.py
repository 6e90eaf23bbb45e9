"""jobs/encode.py: the config's index section, or the same settings as flags, never both."""

from __future__ import annotations

import importlib.util

import pytest

from raggen.config import load_config
from tests.helpers import REPO


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("_raggen_job_encode", REPO / "jobs" / "encode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_mode_builds_what_the_index_section_says(job):
    config = str(REPO / "configs" / "wiki-dpr-21m.yaml")
    args = job.parse_args([config, "--set", "index.num_shards=4", "--work-dir", "/tmp/w", "--no-embeddings"])
    kwargs = job.build_kwargs(args)
    expected = load_config(config, ["index.num_shards=4"]).index.build_kwargs()
    expected["store_embeddings"] = False  # --no-embeddings overrides the config's index.store_embeddings
    assert {k: kwargs[k] for k in expected} == expected and kwargs["num_shards"] == 4
    assert kwargs["work_dir"] == "/tmp/w"
    # without the flag the config rules: true by default, false when the config says so
    assert job.build_kwargs(job.parse_args([config]))["store_embeddings"] is True
    kept = job.build_kwargs(job.parse_args([config, "--set", "index.store_embeddings=false"]))
    assert kept["store_embeddings"] is False


def test_flag_mode_and_normalize(job):
    kwargs = job.build_kwargs(
        job.parse_args(["--passages", "p.tsv", "--output", "ix", "--normalize", "--num-shards", "3"])
    )
    assert (kwargs["passages_uri"], kwargs["output_uri"], kwargs["normalize"], kwargs["num_shards"]) == (
        "p.tsv",
        "ix",
        True,
        3,
    )
    assert kwargs["s3_options"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["configs/quickstart.yaml", "--num-shards", "3"], "--num-shards"),
        (["--passages", "p.tsv"], "--passages and --output are required"),
        (["--passages", "p", "--output", "o", "--set", "index.num_shards=2"], "--set needs a CONFIG"),
    ],
)
def test_mixed_or_missing_settings_are_usage_errors(job, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        job.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
