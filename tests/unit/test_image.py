"""The container image, checked without Docker: docker/Dockerfile read as text against what
pyproject.toml declares and the Makefile pins, `make image` run with a stand-in `docker`, and the
image name every KubeRay manifest (the base and each overlay as kustomize renders it) and
cluster/aws-gpu.yaml use, against the name `make image` builds.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
VARIANTS = ("cpu", "cuda")
# The pyproject extras each variant installs: faiss-gpu on CUDA; no test tools in either.
IMAGE_EXTRAS = {"cpu": set(), "cuda": {"gpu"}}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- the sources of truth ----------


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml pins no ray==X")


@functools.cache
def makefile_vars() -> dict[str, str]:
    out = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^(?:export\s+)?([A-Z_]+)\s*(?:\?=|:=|=)\s*(.*?)\s*$", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def built_image(variant: str) -> str:
    """What `make image VARIANT=variant` tags: $(IMAGE):<pyproject version>-<variant>."""
    return f"{makefile_vars()['IMAGE']}:{pyproject()['project']['version']}-{variant}"


# ---------------------------------------------------------------- Dockerfile as text ------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, buf = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        keyword, _, args = " ".join(buf).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = []
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    out = {}
    for keyword, args in dockerfile():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def stages() -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(FROM argument, stage name, that stage's instructions) per stage."""
    out = []
    for keyword, args in dockerfile():
        if keyword == "FROM":
            ref, *name = re.split(r"\s+as\s+", args, flags=re.IGNORECASE)
            out.append((ref, name[0] if name else None, []))
        elif out:
            out[-1][2].append((keyword, args))
    return out


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1][2]


def base_image(variant: str) -> str:
    """The image the final stage builds on for this VARIANT, following stage references."""
    values = {**global_args(), "VARIANT": variant}
    named = {name: ref for ref, name, _ in stages() if name}
    ref = substitute(stages()[-1][0], values)
    for _ in range(len(named) + 1):
        if ref not in named:
            return ref
        ref = substitute(named[ref], values)
    raise AssertionError("FROM references loop")


def stage_arg(name: str) -> str:
    """An ARG's default in the final stage (or the global default it re-declares)."""
    for keyword, args in final_stage():
        if keyword == "ARG" and args.partition("=")[0] == name:
            return args.partition("=")[2] if "=" in args else global_args()[name]
    raise AssertionError(f"the final stage declares no ARG {name}")


def runs() -> list[str]:
    return [args for keyword, args in final_stage() if keyword == "RUN"]


def the_run(needle: str) -> tuple[int, str]:
    hits = [(i, r) for i, r in enumerate(runs()) if needle in r]
    assert len(hits) == 1, f"expected one RUN with {needle!r}, found {len(hits)}"
    return hits[0]


def variant_branches(run: str) -> dict[str, str]:
    """The two arms of `if [ "$VARIANT" = X ]; then A; else B; fi` by variant."""
    m = re.search(r'if \[ "\$VARIANT" = (\w+) \]; then(.*?)\belse\b(.*?)\bfi\b', run, re.S)
    assert m, f"no if/else on $VARIANT in: {run}"
    (other,) = set(VARIANTS) - {m[1]}
    return {m[1]: m[2], other: m[3]}


def case_arms(run: str) -> dict[str, str]:
    """The arms of `case "$VARIANT" in cpu) ... ;; cuda) ... ;; esac` by variant."""
    return {v: body for v, body in re.findall(r"(\w+)\)\s*(.*?);;", run, re.S)}


def env() -> dict[str, str]:
    out = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def copied_sources() -> list[str]:
    out = []
    for keyword, args in final_stage():
        if keyword == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in shlex.split(args)), "COPY --from: teach this test"
            out += [w.rstrip("/").removeprefix("./") for w in words[:-1]]
    return out


# ---------------------------------------------------------------- .dockerignore -----------------


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _glob_regex(line.lstrip("!").strip().strip("/"))))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    verdict = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


# ---------------------------------------------------------------- manifests ---------------------


@functools.cache
def k8s():
    """tests/unit/test_k8s_manifests.py: its kustomize renderer and helpers."""
    spec = importlib.util.spec_from_file_location("_raggen_k8s_manifests_for_image", HERE / "test_k8s_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest_objects() -> list[tuple[str, dict]]:
    m = k8s()
    objs = [(f"base/{p.name}", o) for p in m.BASE_FILES if p.name != "kustomization.yaml" for o in m.load_docs(p)]
    objs += [(str(kdir.relative_to(m.K8S)), o) for kdir in m.KUSTOMIZATIONS for o in m.render(kdir)]
    return objs


def pod_containers(obj: dict) -> list[tuple[bool, dict]]:
    """(is_worker, container) for every container and init container of the Ray pods."""
    spec = k8s().cluster_spec(obj)
    out = []
    for worker, group in [(False, spec["headGroupSpec"])] + [(True, g) for g in spec.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        out += [(worker, c) for c in pod.get("containers", []) + pod.get("initContainers", [])]
    return out


# ---------------------------------------------------------------- tests: the Dockerfile ---------


def test_every_base_is_the_pinned_ray_on_python_311():
    ray = ray_pin()
    assert global_args().get("VARIANT") == "cpu", "ARG VARIANT=cpu before the first FROM"
    names = {name for _, name, _ in stages() if name}
    for ref, _, _ in stages():
        for variant in VARIANTS:
            image = substitute(ref, {**global_args(), "VARIANT": variant})
            assert image in names or re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311(-cpu|-cu\d{{3}})?", image), (
                f"FROM {ref} -> {image}: neither a stage nor rayproject/ray:{ray}-py311[-cpu|-cuXYZ]"
            )
    assert base_image("cpu") in (f"rayproject/ray:{ray}-py311-cpu", f"rayproject/ray:{ray}-py311")
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-cu\d{{3}}", base_image("cuda")), base_image("cuda")
    assert "RAY_VERSION" not in global_args() or global_args()["RAY_VERSION"] == ray


def test_torch_is_the_makefiles_pin_installed_first_from_the_right_index():
    assert stage_arg("TORCH") == makefile_vars()["TORCH"], "the image's torch pin is the Makefile's TORCH"
    i, run = the_run('pip install "$TORCH"')
    arms = case_arms(run)
    assert set(VARIANTS) <= set(arms), f"a torch index per variant: {arms}"
    assert "index=https://download.pytorch.org/whl/cpu" in arms["cpu"].replace(" ", "")
    assert "/whl/cpu" not in arms["cuda"], "the CUDA variant must not get the CPU wheel"
    assert '--index-url "${TORCH_INDEX_URL:-$index}"' in run
    j, _ = the_run("requirements.txt")
    k, _ = the_run("pip install -e")
    assert i < j and i < k, "torch before the project's dependencies, or `torch>=2.4` pulls PyPI's build"


def test_dependency_layer_installs_exactly_what_pyproject_declares(tmp_path):
    """Run the RUN's own `python -c` against pyproject.toml: it must list the declared dependencies."""
    _, run = the_run("requirements.txt")
    argv = shlex.split(run.split(">")[0])
    assert argv[:2] == ["python", "-c"], argv
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == pyproject()["project"]["dependencies"]
    assert "pip install -r /tmp/requirements.txt" in run
    copied_before = [a for kw, a in final_stage()[: [a for _, a in final_stage()].index(run)] if kw == "COPY"]
    assert any("pyproject.toml" in a for a in copied_before) and not any(
        "raggen" in a.split() for a in copied_before
    ), "the dependency layer sees pyproject.toml only, so code edits keep it cached"


def test_installs_the_project_with_the_extras_each_variant_needs():
    declared = set(pyproject()["project"]["optional-dependencies"])
    assert set().union(*IMAGE_EXTRAS.values()) <= declared, f"extras the image needs, not in pyproject: {declared}"
    _, run = the_run("pip install -e")
    for variant, body in variant_branches(run).items():
        installs = re.findall(r'pip install -e "\.(?:\[([^\]]*)\])?"', body)
        assert len(installs) == 1, f"{variant}: one editable install of the project, found {installs}"
        extras = {e.strip() for e in installs[0].split(",") if e.strip()}
        assert extras == IMAGE_EXTRAS[variant], f"{variant} installs .[{installs[0]}]"


def test_cuda_variant_swaps_faiss_cpu_for_the_gpu_extras_faiss():
    (gpu_faiss,) = [d for d in pyproject()["project"]["optional-dependencies"]["gpu"] if d.startswith("faiss-gpu")]
    _, run = the_run("pip install -e")
    branches = variant_branches(run)
    cuda = branches["cuda"]
    uninstall = re.search(r"pip uninstall -y ([^&;]*)", cuda)
    assert uninstall and "faiss-cpu" in uninstall[1].split(), "faiss-cpu must go: both install the `faiss` module"
    reinstall = re.search(r'pip install --no-deps "([^"]+)"', cuda)
    assert reinstall and reinstall[1] == gpu_faiss, f"reinstall {gpu_faiss}, as pyproject's gpu extra says"
    assert uninstall.start() < reinstall.start()
    assert "faiss-gpu" not in branches["cpu"]


def test_environment_workdir_and_no_forced_offline():
    e = env()
    assert e.get("TOKENIZERS_PARALLELISM") == "false"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert name not in e, f"{name}: pods on a cluster download models; the image must not forbid it"
    (workdir,) = [a for kw, a in final_stage() if kw == "WORKDIR"]
    for where, obj in manifest_objects():
        for _, c in pod_containers(obj):
            assert c["workingDir"] == workdir, f"{where}: jobs start in the image's WORKDIR"
    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    (mount,) = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert mount == workdir, "the cluster launcher syncs the checkout over the image's editable install"


def test_copies_what_the_build_and_the_jobs_need_and_dockerignore_lets_it_through():
    rules = ignore_rules(DOCKERIGNORE.read_text())
    copied = copied_sources()
    project = pyproject()["project"]
    needed = {"pyproject.toml", project["readme"], *project.get("license-files", []), "raggen"}
    # Paths the manifests run or read, relative to the WORKDIR: jobs/*.py, configs/*.yaml.
    for _, obj in manifest_objects():
        words = shlex.split(obj["spec"].get("entrypoint", "")) + [
            obj["metadata"].get("annotations", {}).get("raggen.io/config", "")
        ]
        needed |= {w.split("/")[0] for w in words if re.fullmatch(r"[\w.-]+/[\w./-]+\.(py|yaml)", w)}
    assert needed <= set(copied), f"not copied into the image: {sorted(needed - set(copied))}"
    for source in copied:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such path"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        assert files, f"COPY {source}: empty"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not ignored(rel, rules), f".dockerignore drops {rel}, which COPY {source} needs"


def test_dockerignore_keeps_local_state_out_of_the_context():
    rules = ignore_rules(DOCKERIGNORE.read_text())
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/quickstart/result.json",
        "artifacts/index/manifest.json",
        ".pytest_cache/v/cache/nodeids",
        "raggen/__pycache__/cli.cpython-311.pyc",
        "raggen.egg-info/PKG-INFO",
    ):
        assert ignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "raggen/cli/parser.py", "jobs/train.py", "configs/quickstart.yaml"):
        assert not ignored(path, rules), path


def test_dockerignore_matcher_follows_dockers_rules():
    rules = ignore_rules("*.md\n!README.md\n**/tmp\ndocs/\n")
    assert ignored("NOTES.md", rules) and not ignored("README.md", rules)
    assert ignored("a/b/tmp/x", rules) and ignored("tmp", rules) and ignored("docs/index.html", rules)
    assert not ignored("a/NOTES.md", rules) and not ignored("docsx/y", rules)


def test_license_is_apache_2_in_file_metadata_and_image_label():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 the raggen authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and "LICENSE" in project["license-files"]
    (requires,) = [r for r in pyproject()["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=\s*(\d+)", requires)[1]) >= 77, "PEP 639 license metadata needs setuptools>=77"
    (labels,) = [a for kw, a in final_stage() if kw == "LABEL"]
    assert (
        dict(item.partition("=")[::2] for item in shlex.split(labels))["org.opencontainers.image.licenses"]
        == project["license"]
    )


# ---------------------------------------------------------------- tests: one image name ---------


def test_every_manifest_names_the_image_make_builds():
    """A Ray pod whose workers request GPUs runs the CUDA image, any other the CPU image: the base
    (GPU worker groups) and gpu-prod CUDA, cpu-dev CPU, all with `make image`'s name and tag."""
    seen = set()
    for where, obj in manifest_objects():
        variant = "cuda" if any(GPU in c["resources"].get("limits", {}) for w, c in pod_containers(obj) if w) else "cpu"
        seen.add((where.split("/")[0] if where.startswith("base/") else where, variant))
        for _, c in pod_containers(obj):
            assert c["image"] == built_image(variant), f"{where} {obj['kind']}/{obj['metadata']['name']}: {c['image']}"
    overlays = {where: v for where, v in seen if where.startswith("overlays/")}
    assert (
        ("base", "cuda") in seen
        and overlays.get("overlays/gpu-prod") == "cuda"
        and overlays.get("overlays/cpu-dev") == "cpu"
    ), seen


def test_overlay_image_entries_match_the_bases_image():
    """A kustomize `images:` entry whose name matches no container is silently a no-op."""
    repository = makefile_vars()["IMAGE"]
    for kdir in k8s().OVERLAYS:
        for entry in yaml.safe_load((kdir / "kustomization.yaml").read_text()).get("images", []):
            assert entry["name"] == repository and entry.get("newName", repository) == repository, (kdir.name, entry)


def test_cluster_launcher_runs_the_cuda_image():
    docker = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())["docker"]
    assert docker["image"] == built_image("cuda")
    for key in ("head_image", "worker_image"):
        assert docker.get(key, built_image("cuda")) == built_image("cuda"), key


# ---------------------------------------------------------------- tests: make image -------------

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None or shutil.which("sed") is None, reason="make and sed needed")


def _make_image(tmp_path: Path, docker_script: str | None, *args: str) -> subprocess.CompletedProcess:
    """`make image ARGS` with PATH holding only sed and, if given, a stand-in `docker`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "sed").exists():
        (bin_dir / "sed").symlink_to(shutil.which("sed"))
    if docker_script is not None:
        (bin_dir / "docker").write_text("#!/bin/sh\n" + docker_script)
        (bin_dir / "docker").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(
        [MAKE, "-s", "-C", str(REPO), "image", *args], env=env, capture_output=True, text=True, timeout=60
    )


@needs_make
@pytest.mark.parametrize("variant", VARIANTS)
def test_make_image_builds_the_dockerfile_under_the_manifests_name(tmp_path, variant):
    log = tmp_path / "docker.log"
    proc = _make_image(tmp_path, f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n', f"VARIANT={variant}")
    assert proc.returncode == 0, proc.stderr
    (build,) = [shlex.split(c) for c in log.read_text().splitlines() if c.startswith("build ")]
    opts = dict(zip(build[1:-1:2], build[2:-1:2]))
    assert (REPO / opts["-f"]).resolve() == DOCKERFILE and build[-1] == "."
    assert opts["-t"] == built_image(variant)
    assert f"VARIANT={variant}" in [build[i + 1] for i, w in enumerate(build) if w == "--build-arg"]


@needs_make
@pytest.mark.parametrize(
    "docker_script, args, message",
    [
        (None, (), "docker is not installed"),
        ('[ "$1" = info ] && exit 1\nexit 0\n', (), "daemon"),
        ("exit 0\n", ("VARIANT=gpu",), "VARIANT must be cpu or cuda"),
    ],
    ids=["no-docker", "no-daemon", "bad-variant"],
)
def test_make_image_fails_clearly_without_docker(tmp_path, docker_script, args, message):
    log = tmp_path / "builds"
    script = (
        None if docker_script is None else f'[ "$1" = build ] && echo x >> {shlex.quote(str(log))}\n' + docker_script
    )
    proc = _make_image(tmp_path, script, *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not log.exists(), "nothing may be built"
