"""``raggen serve`` / ``raggen serve swap``: a raggen config -> ``build_app`` args -> a deployed Serve app."""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from raggen.errors import ConfigError, RaggenError
from raggen.serve.app import APP_NAME, deploy_config, serve_deploy_config, wait_until_running, with_index


def app_args_from_config(cfg: Any) -> dict[str, Any]:
    """A raggen config (``serve`` + ``model`` sections) as ``build_app`` args.

    ``serve.model_dir`` (a trained checkpoint) supplies ``query_encoder/``, ``generator/`` and
    ``reranker/`` where it holds them; the ``model`` section supplies the rest. A local folder is
    looked into; an ``s3://`` checkpoint is not read here (a Serve config is often made offline):
    it holds what ``train.estimator`` trains, and the replicas download those folders and fail
    loudly if one is missing. A local ``model_dir`` holding none of them is an error: serving the
    untrained models by mistake would be silent.
    """
    from raggen.storage import is_s3_uri, join_uri
    from raggen.train.step import trainable_roles

    s, m, t = cfg.serve, cfg.model, cfg.train
    encoder = m.query_encoder.model_dump()
    generator, reranker = m.generator, m.reranker
    if s.model_dir:
        served = ("query_encoder", "generator", "reranker")
        if is_s3_uri(s.model_dir):
            held = [r for r in trainable_roles(t.estimator, t.trains_generator, t.train_passage_encoder) if r in served]
        else:
            from raggen.models.exports import model_folders  # an export through its LATEST, or a plain folder

            held = [name for name in served if name in model_folders(s.model_dir)]
        if not held:
            raise ConfigError(f"serve.model_dir: {s.model_dir}: holds no query_encoder/, generator/ or reranker/ model")
        found = {name: join_uri(s.model_dir, name) for name in held}
        encoder["name_or_path"] = found.get("query_encoder", encoder["name_or_path"])
        generator, reranker = found.get("generator", generator), found.get("reranker", reranker)
    return dict(
        index=s.index,
        index_search=cfg.index.search.model_dump(mode="json"),
        s3=s.s3.storage_options(),
        query_encoder=encoder,
        generator=generator,
        reranker=reranker,
        max_source_length=m.max_source_length,
        max_target_length=max(m.max_target_length, s.max_new_tokens + 1),
        retrieval=cfg.retrieval.model_dump(),
        **s.serving_args(),
    )


def _deploy_config_of(cfg: Any) -> dict[str, Any]:
    s = cfg.serve
    return serve_deploy_config(
        app_args_from_config(cfg),
        route_prefix=s.route_prefix,
        host=s.host,
        port=s.port,
        request_timeout_s=s.request_timeout_s,
    )


def check_served_models(args: dict[str, Any]) -> None:
    """The models the replicas will load, checked where the user typed them (see
    :func:`raggen.models.loading.check_model_reference`)."""
    from raggen.models.loading import check_model_reference

    check_model_reference("model.query_encoder.name_or_path", args["query_encoder"]["name_or_path"])
    check_model_reference("model.generator", args["generator"])
    if args["reranker"]:
        check_model_reference("model.reranker", args["reranker"])


def check_serve_exposure(cfg: Any) -> None:
    """``raggen serve``'s early check: a non-loopback ``serve.host`` needs the token in this
    environment (what a local Ray's replicas inherit) or ``serve.allow_unauthenticated: true``.
    The Ingress repeats it where the token is read, so a cluster's replicas check their own."""
    from raggen.serve.auth import token_from_env
    from raggen.serve.resilience import check_exposure

    s = cfg.serve
    check_exposure(s.host, token_from_env(s.api_token_env), s.allow_unauthenticated, token_env=s.api_token_env)


def swap_index_from_config(
    cfg: Any,
    version: str | None = None,
    index: str | None = None,
    watch_latest: bool | None = None,
    timeout_s: float = 120.0,
    expect_version: str | None = None,
) -> dict[str, Any]:
    """Hot-swap the index of the app :func:`serve_from_config` deployed from ``cfg`` (same Ray cluster).

    Redeploys the same Serve config with only the Retriever's ``user_config`` changed (Serve calls
    ``reconfigure``; no replica restarts), then waits until ``GET /v1/index`` reports ``version``
    or a refusal of it (``expect_version``: the version to wait for when ``version`` is None, e.g.
    LATEST's). Returns that index info (``last_error`` set if the version was refused).
    """
    import httpx

    s = cfg.serve
    watch = s.watch_latest if watch_latest is None else watch_latest
    config = with_index(
        _deploy_config_of(cfg),
        index or s.index,
        version,
        watch_latest=watch and version is None,
        watch_interval_s=s.watch_interval_s,
    )
    deploy_config(config)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}/v1/index"
    from raggen.serve.auth import token_from_env

    token = token_from_env(s.api_token_env)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    want = version or expect_version
    while time.monotonic() < deadline:
        try:
            info = httpx.get(url, headers=headers, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            info = {}
        refused = info.get("last_error") and (
            want in info["last_error"]  # redacted: only "requested" names it
            or str(info.get("requested") or "").rpartition("@")[2] == want
        )
        if want is None or info.get("version") == want or refused:
            return info
        time.sleep(0.5)
    raise RaggenError(f"index swap to {want!r} not visible at {url} after {timeout_s:.0f}s (last: {info})")


def serve_from_config(cfg: Any, blocking: bool = True) -> str:
    """``raggen serve CONFIG``: start Ray locally if no cluster, deploy, print the URL, block until ^C.
    ``blocking=False`` (``--detach``) returns after deploying, so the app needs a cluster that outlives
    this process: the running one (or the caller's Ray, as the dry run's), never one started here."""
    from raggen.ray_utils import ensure_ray, join_running_cluster

    s = cfg.serve
    check_serve_exposure(cfg)  # before anything starts
    config = _deploy_config_of(cfg)
    check_served_models(config["applications"][0]["args"])
    if blocking:
        ensure_ray()
    else:
        join_running_cluster("serve --detach")
    deploy_config(config)
    wait_until_running(APP_NAME)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    print(
        f"raggen: serving on {url}  (POST {url}/v1/answer, POST {url}/v1/chat/completions, "
        f"GET {url}/v1/index, GET {url}/healthz)",
        flush=True,
    )
    if not blocking:
        print("raggen: deployed; the service lives as long as the Ray cluster it runs on", flush=True)
        return url
    _stop_on_sigterm()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("raggen: shutting down Serve", flush=True)
        serve.shutdown()
    return url


def _stop_on_sigterm() -> None:
    """``kill``/``docker stop`` send SIGTERM: shut Serve down as Ctrl-C does instead of dying mid-request."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


#: an app in these states is on its way to RUNNING (a previous swap's or an autoscaling change's
#: rollout): a swap waits for it instead of refusing
SETTLING_STATUSES = ("DEPLOYING", "NOT_STARTED")


def _app_status(name: str) -> str:
    app = serve.status().applications.get(name)
    return "absent" if app is None else str(getattr(app.status, "value", app.status))


def settled_status(read_status: Any, *, timeout_s: float, poll_s: float = 0.5) -> str:
    """``read_status()`` once it leaves :data:`SETTLING_STATUSES` (or its last value at ``timeout_s``):
    a swap right after another finds the app DEPLOYING while the Retriever replicas take the new
    ``user_config``, and must wait for it rather than report that no service runs."""
    deadline = time.monotonic() + timeout_s
    status = read_status()
    while status in SETTLING_STATUSES and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = read_status()
    return status


def swap_running_index(cfg: Any, version: str | None = None, *, timeout_s: float = 120.0) -> tuple[str, dict[str, Any]]:
    """``raggen serve swap CONFIG --version V | --latest``: pin the running service (the app
    :func:`serve_from_config` deployed from ``cfg``) to ``version`` of ``serve.index``, or (None)
    unpin it: serve the version LATEST names, following it when ``serve.watch_latest``.

    Connects to the Ray cluster that runs it (``RAY_ADDRESS``, else the one ``ray start`` left on this
    machine: :func:`raggen.ray_utils.join_running_cluster`), redeploys with
    only the Retriever's ``user_config`` changed and returns the service's ``/v1/index`` once it
    reports the version or a refusal of it: (the version asked for, that info); the service refused
    it (and keeps serving the old one) when ``info["version"]`` differs."""
    from raggen.index import read_latest
    from raggen.ray_utils import join_running_cluster

    s = cfg.serve
    join_running_cluster("serve swap", log_to_driver=False)  # stdout: the /v1/index JSON only
    status = settled_status(lambda: _app_status(APP_NAME), timeout_s=timeout_s)
    if status != "RUNNING":
        raise RaggenError(f"serve swap: no running raggen service on this Ray cluster (app {APP_NAME!r}: {status})")
    want = version or read_latest(s.index, s.s3.storage_options())
    if want is None:
        raise ConfigError(f"serve.index: {s.index}: LATEST names no version (nothing published)")
    return want, swap_index_from_config(cfg, version, timeout_s=timeout_s, expect_version=want)
