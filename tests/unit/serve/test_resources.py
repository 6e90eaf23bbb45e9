"""Per-deployment resources and autoscaling: ``serve.deployments.<name>`` overrides the shared
defaults field by field, in the raggen config, in the Serve app args, and in the options
``build_app`` hands to Serve (tests/integration/test_serve_openai.py reads them back from a running
Serve); the shipped wiki config puts the generator on a GPU and the retriever on CPUs with RAM."""

from __future__ import annotations

import pytest

from raggen.app.serving import app_args_from_config
from raggen.config import load_config
from raggen.errors import ConfigError
from raggen.serve.app import GIB, deployment_resources, parse_app_args
from tests.helpers import REPO

SHARED = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}


def _args(**extra) -> dict:
    return {
        "index": "/idx",
        "generator": "/gen",
        "replica_num_cpus": 1.0,
        "replica_num_gpus": 0.5,
        "autoscaling": SHARED,
        **extra,
    }


def test_shared_defaults_apply_where_a_deployment_sets_nothing():
    a = parse_app_args(_args())
    for role in ("retriever", "reranker", "generator"):
        res = deployment_resources(a, role)
        assert res["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
        assert res["autoscaling_config"]["max_replicas"] == 4
    ingress = deployment_resources(a, "ingress")  # its own small default, never the shared GPU
    assert ingress["ray_actor_options"] == {"num_cpus": 0.1, "num_gpus": 0.0}
    assert ingress["autoscaling_config"]["max_replicas"] == 4


def test_each_deployment_overrides_field_by_field():
    a = parse_app_args(
        _args(
            replica_memory_gb=2,
            deployments={
                "retriever": {"num_cpus": 4, "num_gpus": 0, "memory_gb": 32},
                "generator": {"num_gpus": 1, "autoscaling": {"max_replicas": 8, "target_ongoing_requests": 6}},
                "ingress": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 2}},
            },
        )
    )
    retriever, generator = deployment_resources(a, "retriever"), deployment_resources(a, "generator")
    assert retriever["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0, "memory": 32 * GIB}
    assert retriever["autoscaling_config"] == parse_app_args(_args()).autoscaling.model_dump()
    assert generator["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1, "memory": 2 * GIB}
    assert {k: generator["autoscaling_config"][k] for k in SHARED} == {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 6,
    }
    assert deployment_resources(a, "reranker")["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "memory": 2 * GIB,
    }
    ingress = deployment_resources(a, "ingress")
    assert ingress["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}  # no shared memory for the ingress
    assert (ingress["autoscaling_config"]["min_replicas"], ingress["autoscaling_config"]["max_replicas"]) == (2, 4)


@pytest.mark.parametrize(
    "deployments, where",
    [
        ({"generator": {"autoscaling": {"min_replicas": 6}}}, "deployments.generator.autoscaling"),
        ({"retriever": {"num_cpus": 0}}, "deployments.retriever.num_cpus"),
        ({"generator": {"num_gpu": 1}}, "deployments.generator.num_gpu"),
        ({"decoder": {}}, "deployments.decoder"),
    ],
)
def test_bad_overrides_name_the_field(deployments, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        parse_app_args(_args(deployments=deployments))
    with pytest.raises(ConfigError, match=where.split(".")[-1]):
        load_config(None, [f"serve.autoscaling={SHARED}", f"serve.deployments={deployments}"])


def test_config_keys_and_overrides_reach_the_app_args():
    cfg = load_config(
        None,
        [
            "serve.replica_num_cpus=0.5",
            "serve.deployments.generator.num_gpus=1",
            "serve.deployments.retriever.memory_gb=16",
        ],
    )
    a = parse_app_args(app_args_from_config(cfg))
    assert deployment_resources(a, "generator")["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}
    assert deployment_resources(a, "retriever")["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 16 * GIB,
    }


def test_wiki_config_puts_the_generator_on_a_gpu_and_the_retriever_on_cpus_with_ram():
    a = parse_app_args(app_args_from_config(load_config(REPO / "configs" / "wiki-dpr-21m.yaml")))
    generator, retriever = deployment_resources(a, "generator"), deployment_resources(a, "retriever")
    assert generator["ray_actor_options"]["num_gpus"] == 1
    assert retriever["ray_actor_options"]["num_gpus"] == 0 and retriever["ray_actor_options"]["memory"] >= 16 * GIB
    assert deployment_resources(a, "ingress")["ray_actor_options"]["num_gpus"] == 0
