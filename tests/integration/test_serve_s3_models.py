"""A trained checkpoint on S3 (``serve.model_dir: s3://...``, as configs/wiki-dpr-21m.yaml serves it):
the app args name its models by URI, and the Serve deployments' own constructors download and
load them (run here in-process, without Serve, against a moto S3 server on loopback)."""

from __future__ import annotations

import os

import pytest
import torch

from raggen.app.serving import app_args_from_config
from raggen.config import load_config
from raggen.errors import ConfigError
from raggen.models import Generator, TextEncoder, make_tiny_encoder, make_tiny_generator
from raggen.models.loading import fetch_model_dir
from raggen.serve import deployments
from raggen.storage import upload_dir

pytestmark = pytest.mark.integration


@pytest.fixture()
def checkpoint_on_s3(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):  # what the config's s3 section leaves to the environment
        monkeypatch.setenv(name, options["aws_access_key_id"])
    local = tmp_path / "final"
    make_tiny_generator(str(local / "generator"), d_model=32, layers=1, heads=2, ffn=64)
    make_tiny_encoder(str(local / "query_encoder"), d_model=32, heads=2)
    (local / "state.json").write_text("{}")
    uri = f"s3://{bucket}/runs/demo/final"
    upload_dir(local, uri, options)
    overrides = [
        f"serve.model_dir={uri}",
        f"serve.s3.endpoint_url={options['endpoint_url']}",
        f"serve.s3.region={options['region_name']}",
    ]
    return uri, local, options, overrides


def test_s3_model_dir_names_the_models_and_the_replicas_load_them(checkpoint_on_s3):
    uri, local, options, overrides = checkpoint_on_s3
    args = app_args_from_config(load_config(None, overrides))
    assert args["generator"] == f"{uri}/generator"
    assert args["query_encoder"]["name_or_path"] == f"{uri}/query_encoder"
    assert args["reranker"] is None  # the checkpoint has none and the config names none

    replica = deployments.Generator.func_or_class(
        path=args["generator"], max_source_length=64, max_target_length=8, num_beams=1, s3=args["s3"]
    )
    reference = Generator.from_pretrained(str(local / "generator"), max_source_length=64, max_target_length=8)
    batch = (["where?"], [["in the mill", "at sea"]], ["mill"])
    with torch.no_grad():
        assert torch.equal(replica.model.token_logprobs(*batch)[0], reference.token_logprobs(*batch)[0])

    fetched = fetch_model_dir(args["query_encoder"]["name_or_path"], args["s3"])
    assert sorted(os.listdir(fetched)) == sorted(os.listdir(local / "query_encoder"))
    assert TextEncoder.from_pretrained(fetched).dim == 32


def test_missing_models_fail_loudly_at_config_or_replica_start(checkpoint_on_s3, tmp_path):
    """A local model_dir with no model is a config error; an s3:// one is not read at config time
    (Serve configs are made offline), so the replica that cannot find its folder refuses to start."""
    uri, _, options, overrides = checkpoint_on_s3
    (tmp_path / "empty-run").mkdir()
    local_empty = [
        o if not o.startswith("serve.model_dir=") else f"serve.model_dir={tmp_path / 'empty-run'}" for o in overrides
    ]
    with pytest.raises(ConfigError, match="serve.model_dir: .*empty-run: holds no"):
        app_args_from_config(load_config(None, local_empty))
    s3_empty = [o if not o.startswith("serve.model_dir=") else f"serve.model_dir={uri}/nothing-here" for o in overrides]
    args = app_args_from_config(load_config(None, s3_empty))
    with pytest.raises(ConfigError, match="nothing-here/generator: not a model folder"):
        deployments.Generator.func_or_class(path=args["generator"], s3=args["s3"])
    with pytest.raises(ConfigError, match="not a model folder"):
        fetch_model_dir(uri, options)  # the checkpoint root: sub-folders, no config.json
