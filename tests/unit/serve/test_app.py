"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import pytest
import yaml

from raggen.errors import ConfigError
from raggen.serve.schemas import RequestLimits
from tests.helpers import REPO

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- app builders


def test_app_args_and_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raggen.serve.app import parse_app_args, serve_deploy_config, with_index

    with pytest.raises(ConfigError, match=r"args\.generator"):
        parse_app_args({"index": "/idx"})
    with pytest.raises(ConfigError, match=r"args\.autoscaling"):
        parse_app_args({"index": "/i", "generator": "/g", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    config = serve_deploy_config({"index": "/idx", "generator": "/g"}, port=8123)
    ServeDeploySchema.model_validate(config)
    swapped = with_index(config, "/idx", "v2")
    ServeDeploySchema.model_validate(swapped)
    before, after = config["applications"][0], swapped["applications"][0]
    assert before["args"] == after["args"]  # args unchanged: Serve reconfigures instead of restarting
    assert after["deployments"][0]["user_config"]["version"] == "v2"
    assert before["deployments"][0]["user_config"]["version"] is None


def test_shipped_serve_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raggen.serve.app import IMPORT_PATH, parse_app_args

    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        parse_app_args(app.args)


@pytest.mark.parametrize("config_file", [None, "quickstart.yaml"])
def test_raggen_config_becomes_valid_app_args(config_file):
    from raggen.app.serving import app_args_from_config
    from raggen.config import load_config
    from raggen.serve.app import parse_app_args

    cfg = load_config(
        REPO / "configs" / config_file if config_file else None,
        ["serve.s3.endpoint_url=http://127.0.0.1:9000", "serve.s3.region=eu-west-1"],
    )
    args = parse_app_args(app_args_from_config(cfg))
    assert args.index == cfg.serve.index and args.max_top_k == cfg.serve.max_top_k
    assert args.s3 == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1", "max_attempts": 5}
    assert args.max_target_length > args.max_new_tokens  # room for the answer and its EOS
