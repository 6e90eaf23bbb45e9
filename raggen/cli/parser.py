"""The ``raggen`` command. Each subcommand reads a config, applies ``--set a.b=v`` overrides and calls
one library function; errors a user can fix print as one line (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from raggen.cli.failures import failure_message
from raggen.cli.index import (
    cmd_index_build,
    cmd_index_list,
    cmd_index_publish,
    cmd_index_refresh,
    cmd_index_rm,
    cmd_index_search,
    cmd_index_set_latest,
    cmd_index_verify,
)
from raggen.cli.rehearsal import cmd_dry_run, cmd_quickstart
from raggen.cli.serve import cmd_ask, cmd_serve, cmd_serve_swap
from raggen.cli.train import cmd_eval, cmd_pretrain_reader, cmd_report, cmd_retrieve, cmd_train
from raggen.cli.world import cmd_world

log = logging.getLogger("raggen")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _index_uri(text: str) -> str:
    """An index root, version folder or s3:// prefix. A file is refused by name: a config file,
    which the other commands take first, otherwise failed as "Not a directory: 'x.yaml/LATEST'"."""
    from pathlib import Path

    path = Path(text)
    if text.startswith("s3://") or not path.is_file():
        return text
    hint = ""
    if path.suffix in (".yaml", ".yml"):
        output = _config_index_output(path)
        index = output or "the index folder or s3:// prefix it builds (index.output)"
        hint = f"; it looks like a config: pass it as --config {text} and give {index} as the uri"
    raise argparse.ArgumentTypeError(
        f"{text} is a file, not an index (a folder holding LATEST or a manifest.json, or an s3:// prefix){hint}"
    )


def _config_index_output(path) -> str | None:
    """A config's index.output, if the file reads as one (only to name it in a message)."""
    import yaml

    try:
        output = (yaml.safe_load(path.read_text()) or {}).get("index", {}).get("output")
    except Exception:  # noqa: BLE001 - a hint only: an unreadable file gets the general message
        return None
    return output if isinstance(output, str) else None


def _at_least_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="YAML config file (see configs/)")
    else:
        p.add_argument("--config", default=None, help="YAML config file (defaults when omitted)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. train.lr=3e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raggen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help: str, parent=sub, config: bool | None = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help)
        if config is not None:
            _with_config(p, required=config)
        p.set_defaults(fn=fn)
        return p

    add("world", cmd_world, "write the embedded generated world (passages TSV, QA files, v2)", config=False)
    index = sub.add_parser("index", help="build, search, verify and publish sharded FAISS indexes")
    isub = index.add_subparsers(dest="index_command", required=True)
    add("build", cmd_index_build, "encode a corpus with Ray Data and publish shards", parent=isub)
    p = add("search", cmd_index_search, "search a published index", parent=isub, config=False)
    p.add_argument("uri", type=_index_uri)
    p.add_argument("question")
    p.add_argument("-k", type=_positive_int, default=5)
    p.add_argument("--encoder", default=None, help="query encoder (default: the one the index's manifest records)")
    p.add_argument(
        "--pooling",
        default=None,
        help="query pooling: cls | mean | pooler (default: the manifest's; its normalisation always applies)",
    )
    p.add_argument(
        "--query-prefix",
        default=None,
        help="text before the question, e.g. 'query: ' (default: the manifest's query prompt; '' for none)",
    )
    p.add_argument(
        "--nprobe",
        type=_positive_int,
        default=None,
        help="IVF lists to probe (default: index.search.nprobe, else the version's tuned default)",
    )
    p.add_argument(
        "--ef-search",
        type=_positive_int,
        default=None,
        help="HNSW efSearch (default: index.search.ef_search, else the version's tuned default)",
    )
    p.add_argument(
        "--refine-k-factor",
        type=_at_least_one,
        default=None,
        help="re-ranked indexes (...,RFlat): candidates re-scored per hit "
        "(default: index.search.refine_k_factor, else the version's tuned default)",
    )
    p = add("verify", cmd_index_verify, "check every checksum of a published version", parent=isub, config=False)
    p.add_argument("uri", type=_index_uri)
    p.add_argument("--version", default=None)
    p = add(
        "refresh",
        cmd_index_refresh,
        "re-encode the corpus with a trained passage encoder; publish, move LATEST",
        parent=isub,
    )
    p.add_argument(
        "--encoder",
        required=True,
        metavar="CHECKPOINT_OR_ID",
        help="a training checkpoint (folder or s3://.../final: its passage_encoder/, or query_encoder/ "
        "for a shared-encoder run), or any encoder id or folder",
    )
    p.add_argument(
        "--encoder-role",
        default="auto",
        choices=["auto", "passage", "query"],
        help="which encoder of a checkpoint (auto: passage_encoder/, else a shared run's query_encoder/)",
    )
    p.add_argument("--version", default=None, help="name of the new version (default: a fresh one)")
    p.add_argument("--work-dir", default=None, help="resumable work dir (default: derived from the arguments)")
    p = add(
        "publish",
        cmd_index_publish,
        "copy a verified version to another store and move LATEST",
        parent=isub,
        config=False,
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="move LATEST even when it names a newer version (by the manifests' created time)",
    )
    p = add(
        "list",
        cmd_index_list,
        "the published versions of an index root and which one LATEST names",
        parent=isub,
        config=False,
    )
    p.add_argument("uri", type=_index_uri)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = add("set-latest", cmd_index_set_latest, "verify a version, then point LATEST at it", parent=isub, config=False)
    p.add_argument("uri", type=_index_uri)
    p.add_argument("version")
    p.add_argument("--rollback", action="store_true", help="allow moving LATEST to an older version")
    p = add("rm", cmd_index_rm, "delete a version (never the one LATEST names)", parent=isub, config=False)
    p.add_argument("uri", type=_index_uri)
    p.add_argument("version")
    add("train", cmd_train, "train end to end with Ray Train")
    p = add("eval", cmd_eval, "EM/F1 and retrieval recall of a checkpoint")
    p.add_argument("--checkpoint", default=None)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--split",
        default=None,
        choices=["dev", "test", "changed"],
        help="train.dev_file or the world's (default: test)",
    )
    which.add_argument("--qa", default=None, help="these questions instead: DPR .qa.csv or QA JSONL (path or s3://)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N questions (default: train.eval_examples)")
    p.add_argument(
        "--out",
        default=None,
        metavar="PREDICTIONS_JSONL",
        help="one line per question: question, answers, prediction, em, f1, retrieved_ids (path or s3://)",
    )
    p = add("retrieve", cmd_retrieve, "DPR retrieval results JSON (ctxs with has_answer) + top-k accuracy")
    p.add_argument("--qa", required=True, help="questions: DPR .qa.csv or QA JSONL (path or s3://)")
    p.add_argument("--out", required=True, help="results JSON (path or s3://)")
    p.add_argument(
        "-k", type=_positive_int, default=100, help="passages per question (accuracy at 1, 5, 20, 100 up to k)"
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="first N questions only")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint's query_encoder/ (folder or s3://)")
    p.add_argument("--index", default=None, help="index root or version (default: train.index, as raggen eval)")
    p = add("report", cmd_report, "plot one run's metrics, or compare several, to PNG", config=None)
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folder or s3:// prefix holding metrics.jsonl (or the file itself)",
    )
    p.add_argument("--out", default=None, help="PNG path (default: next to a single run's metrics, else ./report.png)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight in [0, 1) of the smoothed curves (0: raw)")
    p = add("serve", cmd_serve, "deploy the Serve graph (starts Ray locally if no cluster)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="return after deploying, leaving the service on the running Ray cluster (RAY_ADDRESS or `ray start --head`)",
    )
    p = add(
        "serve-swap",
        cmd_serve_swap,
        "(also `serve swap`) pin (--version) or unpin (--latest) the running service's index",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None, help="serve this version of serve.index")
    which.add_argument(
        "--latest", action="store_true", help="serve the version LATEST names (as serve.watch_latest says)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the service to report the swap")
    p = add("ask", cmd_ask, "ask a running raggen service", config=None)
    p.add_argument("question")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--top-k", type=int, default=None, help="default: the service's")
    p.add_argument(
        "--decoding", default="rag-token", choices=["rag-token", "rag-sequence-fast", "rag-sequence-thorough"]
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the service's")
    p = add("pretrain-reader", cmd_pretrain_reader, "pre-train the small reader on fresh world facts", config=None)
    p.add_argument("--out", default="raggen/assets/reader")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--warm-start-encoder",
        default="sentence-transformers/all-MiniLM-L6-v2",
        metavar="ENCODER",
        help="a BART whose encoder is this pretrained BERT-style encoder (default: the bundled MiniLM-L6)",
    )
    start.add_argument("--init-from", default=None, metavar="READER", help="continue from this reader folder")
    start.add_argument(
        "--from-scratch", action="store_true", help="a random ~8M-parameter BART instead (it does not learn to read)"
    )
    p.add_argument("--encoder-layers", type=int, default=3, help="with --warm-start-encoder: keep the first N layers")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (linear warm-up, cosine decay)")
    p.add_argument(
        "--encoder-lr", type=float, default=None, help="peak rate of the encoder and token embeddings (default: --lr)"
    )
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument(
        "--span-weight",
        type=float,
        default=1.0,
        help="weight of an extractive start/end loss on the encoder states (teaches where the answer is; 0 = off)",
    )
    p.add_argument("--eval-examples", type=int, default=64, help="held-out fresh facts for EM and the passage gap")
    p.add_argument("--half", action="store_true", help="save the final weights in float16 (how the reader is shipped)")
    p = add("dry-run", cmd_dry_run, "rehearse a config on CPU: tiny models of the same classes, a small world, 2 steps")
    p.add_argument("--out", required=True, help="folder for the stand-in models, data and outputs")
    p.add_argument(
        "--s3-endpoint",
        default=None,
        help="keep the config's s3:// URIs on this S3-compatible endpoint (default: map them to --out)",
    )
    p.add_argument(
        "--print-overrides", action="store_true", help="only print the --set lines (and build the stand-ins)"
    )
    add(
        "quickstart",
        cmd_quickstart,
        "world -> index -> eval -> JSA train -> eval -> plot -> serve -> hot-swap",
        config=False,
    )
    return parser


def _aliases(argv: list[str]) -> list[str]:
    """``raggen serve swap CONFIG ...`` is the ``serve-swap`` subcommand (``serve`` takes any word
    as its CONFIG, so the two words are joined before parsing)."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            return argv[:i] + ["serve-swap"] + argv[i + 2 :] if argv[i : i + 2] == ["serve", "swap"] else argv
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_aliases(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every failure a user can act on becomes one line
        message = failure_message(e)
        if message is None:
            raise
        print(f"raggen: error: {message}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return 2
    return 0
