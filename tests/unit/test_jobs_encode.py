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
    from raggen.app.indexing import index_build_settings

    config = str(REPO / "configs" / "wiki-dpr-21m.yaml")
    args = job.parse_args([config, "--set", "index.num_shards=4", "--work-dir", "/tmp/w", "--no-embeddings"])
    index = job.index_config(args).index
    expected = load_config(config, ["index.num_shards=4"]).index
    # --no-embeddings overrides the config's index.store_embeddings; everything else is the config's
    assert index_build_settings(index) == index_build_settings(expected).model_copy(update={"store_embeddings": False})
    assert index.num_shards == 4 and index.encoder == expected.encoder and index.search == expected.search
    assert args.work_dir == "/tmp/w"
    # without the flag the config rules: true by default, false when the config says so
    assert job.index_config(job.parse_args([config])).index.store_embeddings is True
    kept = job.index_config(job.parse_args([config, "--set", "index.store_embeddings=false"]))
    assert kept.index.store_embeddings is False


def test_flag_mode_and_normalize(job):
    args = job.parse_args(["--passages", "p.tsv", "--output", "ix", "--normalize", "--num-shards", "3"])
    encoder, settings, search = job.flag_settings(args)
    assert (args.passages, args.output, encoder.normalize, settings.num_shards) == ("p.tsv", "ix", True, 3)
    assert search.target_recall == 0.99  # SearchSettings' default tuning target
    # the flags' own defaults, not the config's
    assert (encoder.max_length, settings.num_actors, settings.actor_num_gpus, settings.store_embeddings) == (
        256,
        1,
        None,
        True,
    )
    assert job.flag_s3_options(args) is None
    assert (encoder.passage_format, encoder.query_prefix, encoder.passage_prefix) == (None, None, "")
    prompted = job.parse_args(["--passages", "p", "--output", "o", "--query-prefix", "query: ", "--passage-prefix",
                               "passage: ", "--passage-format", "pair"])  # fmt: skip
    encoder, _, _ = job.flag_settings(prompted)
    assert (encoder.passage_format, encoder.query_prefix, encoder.passage_prefix) == ("pair", "query: ", "passage: ")
    with pytest.raises(SystemExit):  # with a CONFIG the prompts are the index section's
        job.parse_args(["configs/quickstart.yaml", "--query-prefix", "query: "])


def test_flag_mode_target_recall_reaches_the_builds_search_settings(job):
    _, _, search = job.flag_settings(job.parse_args(["--passages", "p", "--output", "o", "--target-recall", "0.995"]))
    assert search.target_recall == 0.995
    with pytest.raises(SystemExit):  # with a CONFIG it is index.search.target_recall
        job.parse_args(["configs/quickstart.yaml", "--target-recall", "0.995"])


def test_flag_mode_bad_value_is_a_config_error(job):
    from raggen.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        job.flag_settings(job.parse_args(["--passages", "p", "--output", "o", "--batch-size", "0"]))
    with pytest.raises(ConfigError, match="target_recall"):
        job.flag_settings(job.parse_args(["--passages", "p", "--output", "o", "--target-recall", "1.5"]))


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
