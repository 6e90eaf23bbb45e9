"""``raggen serve``, ``serve swap`` and ``ask``: deploy the service, pin its index, ask it."""

from __future__ import annotations

import argparse
import json

from raggen.cli.config_args import config_from_args
from raggen.errors import RaggenError


def cmd_serve(args: argparse.Namespace) -> None:
    from raggen.app.serving import serve_from_config

    serve_from_config(config_from_args(args), blocking=not args.detach)


def cmd_serve_swap(args: argparse.Namespace) -> None:
    """Pin (--version) or unpin (--latest) the running service's index; prints its /v1/index."""
    from raggen.app.serving import swap_running_index

    want, info = swap_running_index(config_from_args(args), version=args.version, timeout_s=args.timeout)
    print(json.dumps(info, indent=2))
    if info.get("version") != want:
        raise RaggenError(
            f"serve swap: the service refused version {want!r} and keeps serving "
            f"{info.get('version')!r} ({info.get('last_error')})"
        )


def cmd_ask(args: argparse.Namespace) -> None:
    from raggen.serve.client import ask

    reply = ask(args.url, args.question, top_k=args.top_k, decoding=args.decoding, max_new_tokens=args.max_new_tokens)
    print(json.dumps(reply, indent=2))
