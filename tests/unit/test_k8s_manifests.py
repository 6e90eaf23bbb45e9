"""Every KubeRay object under k8s/ (the base and each overlay as kustomize renders it) checked
against the KubeRay CRD schemas in shared/kuberay-crds, plus what a schema cannot see: the
Serve config inside a RayService, the runtime env, the entry points and configs a job names.

Overlays are rendered in Python (resources, namespace, labels, images, strategic-merge and JSON
patches); where `kubectl` is installed its `kubectl kustomize` output must agree with ours.
Unknown fields are errors, as with `kubectl apply --validate=strict`.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import REPO

SHARED = REPO.parent / "shared"
CRD_DIR = SHARED / "kuberay-crds"
K8S = REPO / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = [p for p in KUSTOMIZATIONS if "overlays" in p.parts]
GPU = "nvidia.com/gpu"

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRDs not found at {CRD_DIR} (CI clones the repo with shared/ beside it)",
)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _plain(doc: Any) -> Any:
    """A JSON copy: YAML aliases (&env / *env) become independent objects, so patches stay local."""
    return json.loads(json.dumps(doc))


def load_docs(path: Path) -> list[dict]:
    return [_plain(d) for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


# ---------------------------------------------------------------- a small kustomize ---------------


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove (what the overlays use); anything else is an error."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise NotImplementedError(f"JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise KeyError(f"{op['path']}: nothing to {kind}")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise NotImplementedError(f"JSON patch op {kind!r}")


def _merge(target: dict, patch: dict) -> None:
    """Strategic merge as kustomize does it for custom resources: maps merge, lists are replaced
    (a CRD publishes no merge keys), null deletes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"kind", "name", "namespace"}
    if unknown:
        raise NotImplementedError(f"patch target fields {sorted(unknown)}")
    meta = obj["metadata"]
    return all(
        re.fullmatch(target[k], v) is not None
        for k, v in (("kind", obj["kind"]), ("name", meta["name"]), ("namespace", meta.get("namespace", "")))
        if k in target
    )


def _apply_patch(objs: list[dict], entry: dict, kdir: Path) -> None:
    body = (kdir / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = _plain(yaml.load(body, Loader=_Loader))
    if isinstance(patch, list):
        target = entry["target"]  # JSON patches need one
    else:
        target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    hits = [o for o in objs if _matches(o, target)]
    if not hits:
        raise AssertionError(f"{kdir}: patch {entry.get('path', '<inline>')} matches no object ({target})")
    for obj in hits:
        if isinstance(patch, list):
            _json_patch(obj, patch)
        else:
            extra = {k: v for k, v in patch.get("metadata", {}).items() if k in ("labels", "annotations")}
            _merge(obj, {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")})
            _merge(obj["metadata"], extra)


def _set_images(node: Any, image: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, tag = c.get("image", "").partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            else:
                _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def render(kdir: Path) -> list[dict]:
    """The objects `kubectl kustomize kdir` prints, for the kustomization features we use."""
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
    if unknown:
        raise NotImplementedError(f"{kdir}: teach render() about {sorted(unknown)}")
    objs: list[dict] = []
    for res in kust.get("resources", []):
        path = kdir / res
        objs += render(path) if path.is_dir() else load_docs(path)
    for entry in kust.get("patches", []):
        _apply_patch(objs, entry, kdir)
    for obj in objs:
        if "namespace" in kust:
            obj["metadata"]["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        for image in kust.get("images", []):
            _set_images(obj, image)
    return objs


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# ---------------------------------------------------------------- CRD schemas -------------------


def kube_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes dialect) -> JSON Schema: int-or-string, nullable, and closed objects
    (a field the schema does not name is an error, as the API server's strict validation says)."""
    if isinstance(node, list):
        return [kube_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: kube_schema(sub) for name, sub in value.items()}
        else:
            out[key] = kube_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a validator, for every served version of every CRD in shared/."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = kube_schema(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema, format_checker=FORMATS)
    return out


def schema_errors(obj: dict) -> list[str]:
    validator = validators().get((obj.get("apiVersion"), obj.get("kind")))
    if validator is None:
        return [f"no CRD schema for apiVersion={obj.get('apiVersion')!r} kind={obj.get('kind')!r}"]
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# ---------------------------------------------------------------- helpers -----------------------

BASE_FILES = sorted((K8S / "base").glob("*.yaml"))
BASE_OBJECTS = [
    pytest.param(obj, id=f"{path.name}:{obj['kind']}/{obj['metadata']['name']}")
    for path in BASE_FILES
    if path.name != "kustomization.yaml"
    for obj in load_docs(path)
]
RENDERED = [
    pytest.param(obj, id=f"{kdir.relative_to(K8S)}:{obj['kind']}/{obj['metadata']['name']}")
    for kdir in KUSTOMIZATIONS
    for obj in render(kdir)
]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]


def containers(obj: dict, worker: bool) -> list[dict]:
    spec = cluster_spec(obj)
    groups = spec.get("workerGroupSpecs", []) if worker else [spec["headGroupSpec"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def ray_version() -> str:
    import ray

    return ray.__version__


# ---------------------------------------------------------------- tests -------------------------


def test_every_kustomization_is_found_and_renders():
    assert K8S / "base" in KUSTOMIZATIONS and OVERLAYS, "k8s/base and at least one overlay"
    listed = {r for r in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]}
    on_disk = {p.name for p in BASE_FILES} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest in k8s/base is listed in its kustomization, and only those"
    for kdir in OVERLAYS:
        assert {_key(o) for o in render(kdir)} == {_key(o) for o in render(K8S / "base")}


@needs_crds
@pytest.mark.parametrize("obj", BASE_OBJECTS)
def test_base_object_matches_crd_schema(obj):
    assert schema_errors(obj) == []


@needs_crds
@pytest.mark.parametrize("obj", RENDERED)
def test_rendered_object_matches_crd_schema(obj):
    assert schema_errors(obj) == []


@needs_crds
@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda o: o["spec"].__setitem__("rayClusterSpecs", {}), "rayClusterSpecs"),  # a typo
        (lambda o: containers(o, worker=True)[0].__setitem__("workDir", "/x"), "workDir"),  # deep in the pod
        (lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"), "replicas"),
        (lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (lambda o: containers(o, worker=True)[0]["resources"]["limits"].__setitem__("cpu", "8 cores"), "cpu"),
        (
            lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
            "num-cpus",
        ),
        (lambda o: o["spec"].__setitem__("backoffLimit", 2**40), "backoffLimit"),
    ],
    ids=[
        "unknown-field",
        "unknown-container-field",
        "wrong-type",
        "missing-required",
        "bad-quantity",
        "non-string-param",
        "int32-range",
    ],
)
def test_validator_rejects_broken_manifests(mutate, needle):
    """The checks above have teeth: each kind of mistake is reported, at the field that has it."""
    obj = load_docs(K8S / "base" / "rayjob-train.yaml")[0]
    assert schema_errors(obj) == []
    mutate(obj)
    errors = schema_errors(obj)
    assert errors and any(needle in e for e in errors), errors


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: nothing to cross-check against")
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_python_render_agrees_with_kubectl_kustomize(kdir):
    proc = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs = sorted((_plain(d) for d in yaml.safe_load_all(proc.stdout) if d), key=_key)
    ours = sorted(render(kdir), key=_key)
    assert [_key(o) for o in ours] == [_key(o) for o in theirs]
    for a, b in zip(ours, theirs):
        # kustomize re-emits block strings, which may drop one trailing newline
        for o in (a, b):
            if "serveConfigV2" in o["spec"]:
                o["spec"]["serveConfigV2"] = o["spec"]["serveConfigV2"].rstrip("\n")
        assert a == b, f"{_key(a)} differs"


@pytest.mark.parametrize("obj", RENDERED)
def test_cluster_runs_the_pinned_ray_and_token_auth(obj):
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray_version(), "rayVersion must match the Ray that pyproject pins"
    assert spec.get("authOptions", {}).get("mode") == "token", "the dashboard/job API must not be open"
    for c in containers(obj, worker=False) + containers(obj, worker=True):
        assert c["workingDir"] == "/home/ray/raggen", "job paths are relative to the repo in the image"


@pytest.mark.parametrize("kdir", OVERLAYS, ids=lambda p: p.name)
def test_overlay_gpu_requests(kdir):
    """gpu-prod workers each request a GPU (requests == limits, as Kubernetes demands for extended
    resources) and tolerate the GPU taint; cpu-dev asks for no GPU anywhere; heads never do."""
    want_gpu = "gpu" in kdir.name
    for obj in render(kdir):
        for c in containers(obj, worker=False):
            assert GPU not in c["resources"].get("limits", {}), f"{_key(obj)} head asks for a GPU"
        for group in cluster_spec(obj)["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            for c in pod["containers"]:
                res = c["resources"]
                assert res.get("requests", {}).get(GPU) == res.get("limits", {}).get(GPU)
                assert (GPU in res.get("limits", {})) == want_gpu, f"{_key(obj)} {group['groupName']}"
            tolerates = any(t.get("key") == GPU for t in pod.get("tolerations", []))
            assert tolerates == want_gpu
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("kdir", OVERLAYS, ids=lambda p: p.name)
def test_overlay_sets_a_registry_image(kdir):
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    (image,) = kust["images"]
    for obj in render(kdir):
        for c in containers(obj, worker=False) + containers(obj, worker=True):
            assert c["image"] == f"{image['newName']}:{image['newTag']}"


def _load_config(rel: str):
    from raggen.config import load_config

    path = REPO / rel
    assert path.is_file(), f"{rel} does not exist"
    return load_config(path)


def _job_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"_raggen_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode_flags_from_config(cfg) -> dict[str, Any]:
    """jobs/encode.py's flags (argparse dests) that the config's index section fixes."""
    i = cfg.index
    return dict(
        passages=i.passages,
        output=i.output,
        encoder=i.encoder.name_or_path,
        pooling=i.encoder.pooling,
        max_length=i.encoder.max_length,
        batch_size=i.batch_size,
        num_shards=i.num_shards,
        faiss_factory=i.faiss_factory,
        metric=i.metric,
        train_sample=i.train_sample,
        target_recall=i.search.target_recall,
        num_actors=i.num_actors,
        actor_num_cpus=i.actor_num_cpus,
        actor_num_gpus=i.actor_num_gpus,
        s3_region=i.s3.region,
        s3_endpoint_url=i.s3.endpoint_url,
    )


RAYJOBS = [p for p in RENDERED if p.values[0]["kind"] == "RayJob"]


@pytest.mark.parametrize("obj", RAYJOBS)
def test_rayjob_entrypoint_runs_its_config(obj):
    """The entry point exists, accepts its arguments, and runs the config its raggen.io/config
    annotation names: train.py takes that file; encode.py takes flags equal to its index section.
    Ray's job supervisor runs the entry point through a shell, so it must parse there as well (an
    unquoted ``Refine(SQfp16)`` would not)."""
    shell = subprocess.run(["bash", "-n", "-c", obj["spec"]["entrypoint"]], capture_output=True, text=True)
    assert shell.returncode == 0, f"the entry point is not a valid shell command: {shell.stderr}"
    argv = shlex.split(obj["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    script = REPO / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    config_rel = obj["metadata"]["annotations"]["raggen.io/config"]
    cfg = _load_config(config_rel)
    job = _job_module(script)
    if hasattr(job, "parse_args"):  # a flag-style job
        try:
            flags = vars(job.parse_args(argv[2:]))
        except SystemExit:
            pytest.fail(f"{argv[1]} rejects its arguments: {argv[2:]}")
        want = encode_flags_from_config(cfg) if script.name == "encode.py" else {}
        drift = {k: {"entrypoint": flags.get(k), "config": v} for k, v in want.items() if flags.get(k) != v}
        assert not drift, f"entrypoint flags drifted from {config_rel}: {drift}"
    else:  # a config-style job: `python jobs/x.py CONFIG [--set k=v ...]`
        assert argv[2] == config_rel, f"runs {argv[2]}, annotated {config_rel}"


@pytest.mark.parametrize("obj", RAYJOBS)
def test_rayjob_runtime_env_and_cleanup(obj):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # raises on an unknown or malformed field
    assert obj["spec"]["shutdownAfterJobFinishes"] is True
    assert obj["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("obj", [p for p in RENDERED if p.values[0]["kind"] == "RayService"])
def test_rayservice_serve_config_builds_from_its_raggen_config(obj):
    """serveConfigV2 is a valid Serve config, its import_path exists, and its args are what
    raggen.serve.app makes of the config named in the raggen.io/config annotation."""
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(obj["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    source = REPO / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"{app['import_path']}: no {source.relative_to(REPO)}"
    defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert attr in defined, f"{source.relative_to(REPO)} defines no {attr}()"

    from raggen.app.serving import app_args_from_config
    from raggen.serve.app import parse_app_args

    cfg = _load_config(obj["metadata"]["annotations"]["raggen.io/config"])
    expected = parse_app_args(app_args_from_config(cfg))
    want, got = expected.model_dump(), parse_app_args(app["args"]).model_dump()
    drift = {k: {"manifest": got[k], "config": want[k]} for k in want if got[k] != want[k]}
    assert not drift, (
        f"serveConfigV2 args drifted from the config: {drift}; regenerate with "
        "raggen.serve.app.serve_deploy_config(app_args_from_config(load_config(...)))"
    )
    retriever = {d["name"]: d for d in app.get("deployments", [])}["Retriever"]
    assert retriever["user_config"] == expected.index_user_config()


@pytest.mark.parametrize("obj", [p for p in RENDERED if p.values[0]["kind"] == "RayService"])
def test_rayservice_fails_closed_and_bounds_requests(obj):
    """Serving on a non-loopback host needs the API token: every container gets it from a Secret
    that is required (no ``optional: true``: a missing Secret stops the pod, it does not open the
    API), unless the config explicitly sets serve.allow_unauthenticated; http_options carry the
    config's request_timeout_s; no S3 credentials in the Serve args (they come from the env)."""
    from raggen.serve.resilience import is_loopback

    serve_config = yaml.safe_load(obj["spec"]["serveConfigV2"])
    cfg = _load_config(obj["metadata"]["annotations"]["raggen.io/config"])
    http = serve_config["http_options"]
    # the base sets it; an overlay that replaces serveConfigV2 may leave it to Serve's default
    assert http.get("request_timeout_s") in (cfg.serve.request_timeout_s, None)
    (base,) = [d for d in load_docs(K8S / "base" / "rayservice.yaml") if d["kind"] == "RayService"]
    base_http = yaml.safe_load(base["spec"]["serveConfigV2"])["http_options"]
    assert (
        base_http["request_timeout_s"]
        == _load_config(base["metadata"]["annotations"]["raggen.io/config"]).serve.request_timeout_s
    )
    (app,) = serve_config["applications"]
    token_env = app["args"].get("api_token_env", "RAGGEN_API_TOKEN")
    if is_loopback(http.get("host", "127.0.0.1")) or app["args"].get("allow_unauthenticated"):
        return
    for c in containers(obj, worker=False) + containers(obj, worker=True):
        env = {e["name"]: e for e in c.get("env", [])}
        assert token_env in env, f"{c['name']}: no {token_env} while serving on {http['host']}"
        ref = env[token_env].get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref.get("optional", False) is False, f"{c['name']}: {token_env} must come from a required Secret"
    assert not {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"} & set(app["args"].get("s3") or {})


def test_aws_cluster_launcher_yaml_passes_rays_own_validation():
    """cluster/aws-gpu.yaml as `ray up` checks it (defaults filled in, then ray-schema.json),
    running the pinned Ray, with the repository synced to where the nodes start."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    # raggen's CUDA image (docker/Dockerfile: FROM rayproject/ray:<pinned Ray>-py311-cu...);
    # tests/unit/test_image.py checks its name and its base.
    assert re.fullmatch(r"[\w.\-/]+/raggen:[\w.\-]+-cuda", raw["docker"]["image"]), raw["docker"]["image"]
    mounts = raw["file_mounts"]
    repo_mount = next(remote for remote, local in mounts.items() if local == ".")
    for local in mounts.values():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts source {local} missing"
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert f"cd {repo_mount}" in cmd, "jobs start in the synced repository"
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
