"""The ``raggen`` command. Each subcommand reads a config, applies ``--set a.b=v`` overrides and calls
one library function; errors a user can fix print as one line (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from raggen.config import RaggenConfig, load_config, with_absolute_paths
from raggen.errors import ConfigError, RaggenError

log = logging.getLogger("raggen")


def _config(args: argparse.Namespace) -> RaggenConfig:
    return with_absolute_paths(load_config(getattr(args, "config", None), getattr(args, "set", None) or []))


def cmd_world(args: argparse.Namespace) -> None:
    w = _config(args).world
    from raggen.corpus.world import WorldConfig, write_world

    files = write_world(
        w.out_dir, WorldConfig(num_entities=w.num_entities, seed=w.seed, changed_fraction=w.changed_fraction)
    )
    print(json.dumps({k: str(v) for k, v in vars(files).items()}, indent=2))


def cmd_index_build(args: argparse.Namespace) -> None:
    from raggen.app.indexing import build_index_from_config

    cfg = _config(args)
    # a bad factory or an existing version fails before documents are chunked or anything is encoded
    manifest = build_index_from_config(cfg)
    print(
        f"published {cfg.index.output} version {manifest.version}: {manifest.num_passages} passages in {len(manifest.shards)} shards"
    )


def cmd_index_refresh(args: argparse.Namespace) -> None:
    """Re-encode index.passages with a trained (or any) passage encoder; a new version, LATEST moved."""
    from raggen.app.indexing import refresh_index_from_config

    cfg = _config(args)
    manifest, encoder = refresh_index_from_config(
        cfg, args.encoder, role=args.encoder_role, version=args.version, work_dir=args.work_dir
    )
    print(
        f"published {cfg.index.output} version {manifest.version} (LATEST) encoded with {encoder.name_or_path}: "
        f"{manifest.num_passages} passages in {len(manifest.shards)} shards"
    )


def cmd_retrieve(args: argparse.Namespace) -> None:
    from raggen.app.retrieval import retrieve_from_config
    from raggen.train.retrieve import format_accuracy

    result = retrieve_from_config(
        _config(args), args.qa, args.out, k=args.k, limit=args.limit, checkpoint=args.checkpoint, index_uri=args.index
    )
    print(format_accuracy({k: v for k, v in result.items() if k.startswith("top")}, result["questions"]))
    print(f"wrote {result['out']} (index version {result['index_version']})")


def cmd_index_search(args: argparse.Namespace) -> None:
    from raggen.index import search_index

    cfg = _config(args)
    # the manifest's encoder, pooling and normalisation unless --encoder names another
    result = search_index(
        args.uri,
        [args.question],
        k=args.k,
        encoder_name_or_path=args.encoder,
        pooling=args.pooling,
        max_length=cfg.index.encoder.max_length,
        s3_options=cfg.index.s3.storage_options(),
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        settings=cfg.index.search,
        start_ray=True,
    )
    for rank, (pid, score, title, text) in enumerate(
        zip(result.ids[0], result.scores[0], result.titles[0], result.texts[0]), 1
    ):
        print(f"{rank:>2}. [{score:.3f}] {pid} {title}: {text[:120]}")


def cmd_index_verify(args: argparse.Namespace) -> None:
    from raggen.index import verify_index

    # every file is hashed as it streams from the store named (a local cache is never trusted)
    manifest = verify_index(args.uri, version=args.version, s3_options=_config(args).index.s3.storage_options())
    print(
        f"ok: {args.uri} version {manifest.version}, {manifest.num_passages} passages, {len(manifest.shards)} shards, all checksums match"
    )


def cmd_index_publish(args: argparse.Namespace) -> None:
    from raggen.index import publish_index, read_latest

    s3 = _config(args).index.s3.storage_options()
    manifest = publish_index(args.src, args.dst, s3_options=s3, rollback=args.rollback)
    latest = read_latest(args.dst, s3)
    moved = (
        "LATEST now names it"
        if latest == manifest.version
        else f"LATEST stays at the newer {latest} (--rollback moves it back)"
    )
    print(f"published {args.dst} version {manifest.version}; {moved}")


def cmd_index_list(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import format_versions, list_index

    s3 = _config(args).index.s3.storage_options()
    print(format_versions(args.uri, list_index(args.uri, s3_options=s3), as_json=args.json))


def cmd_index_set_latest(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import set_latest_version

    s3 = _config(args).index.s3.storage_options()
    manifest = set_latest_version(args.uri, args.version, rollback=args.rollback, s3_options=s3)
    print(
        f"LATEST under {args.uri} now names {manifest.version} (verified: {manifest.num_passages} passages, "
        f"{len(manifest.shards)} shards)"
    )


def cmd_index_rm(args: argparse.Namespace) -> None:
    from raggen.index.lifecycle import remove_version

    removed = remove_version(args.uri, args.version, s3_options=_config(args).index.s3.storage_options())
    print(f"removed {args.uri} version {args.version} ({len(removed)} files)")


def cmd_serve_swap(args: argparse.Namespace) -> None:
    """Pin (--version) or unpin (--latest) the running service's index; prints its /v1/index."""
    from raggen.app.serving import swap_running_index

    want, info = swap_running_index(_config(args), version=args.version, timeout_s=args.timeout)
    print(json.dumps(info, indent=2))
    if info.get("version") != want:
        raise RaggenError(
            f"serve swap: the service refused version {want!r} and keeps serving "
            f"{info.get('version')!r} ({info.get('last_error')})"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from raggen.app.training import run_training

    result = run_training(_config(args))
    print(json.dumps(result, indent=2, default=str))


def cmd_eval(args: argparse.Namespace) -> None:
    from raggen.app.evaluation import evaluate_from_config

    print(
        json.dumps(
            evaluate_from_config(
                _config(args), checkpoint=args.checkpoint, split=args.split, limit=args.limit, out=args.out
            ),
            indent=2,
        )
    )


def cmd_report(args: argparse.Namespace) -> None:
    """One run: the PNG goes next to its metrics.jsonl; several (or s3://): ./report.png unless --out."""
    from raggen.train.report import metrics_file, plot_runs

    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"--smooth: expected a value in [0, 1), got {args.smooth}")
    out = args.out
    if out is None:
        local = len(args.runs) == 1 and not args.runs[0].startswith("s3://")
        out = metrics_file(args.runs[0]).parent / "metrics.png" if local else "report.png"
    print(plot_runs(args.runs, out, smooth=args.smooth))


def cmd_serve(args: argparse.Namespace) -> None:
    from raggen.app.serving import serve_from_config

    serve_from_config(_config(args), blocking=not args.detach)


def cmd_ask(args: argparse.Namespace) -> None:
    from raggen.serve.client import ask

    reply = ask(args.url, args.question, top_k=args.top_k, decoding=args.decoding, max_new_tokens=args.max_new_tokens)
    print(json.dumps(reply, indent=2))


def cmd_pretrain_reader(args: argparse.Namespace) -> None:
    """The defaults are the shipped reader's recipe (``make reader`` adds ``--seed 3 --half``)."""
    import torch

    from raggen.train.reader import pretrain_reader

    init_from = None  # --from-scratch: a random reader-size BART
    if args.init_from:
        init_from = args.init_from
    elif not args.from_scratch:
        from raggen.models.warm_start import bart_from_bert_encoder

        try:
            init_from = bart_from_bert_encoder(
                args.warm_start_encoder, args.out + ".init", encoder_layers=args.encoder_layers, seed=args.seed
            )
        except (ValueError, OSError) as e:
            raise ConfigError(f"--warm-start-encoder / --encoder-layers: {e}") from None
    print(
        pretrain_reader(
            out_dir=args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            lr=args.lr,
            encoder_lr=args.encoder_lr,
            span_weight=args.span_weight,
            warmup=args.warmup,
            eval_examples=args.eval_examples,
            init_from=init_from,
            save_dtype=torch.float16 if args.half else None,
        )
    )


def cmd_dry_run(args: argparse.Namespace) -> None:
    """Print the --set lines of the rehearsal, or run it (index -> train -> eval -> serve one question)."""
    from raggen.app.dry_run import dry_run_overrides, run_dry_run

    overrides = getattr(args, "set", None) or []
    if args.print_overrides:
        for line in dry_run_overrides(args.config, args.out, s3_endpoint=args.s3_endpoint, overrides=overrides):
            print(f"--set {line}")
        return
    report = run_dry_run(args.config, args.out, s3_endpoint=args.s3_endpoint, overrides=overrides)
    print(json.dumps(report, indent=2, default=str))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from raggen.app.quickstart import run_quickstart

    run_quickstart(_config(args))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
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
    p.add_argument("uri")
    p.add_argument("question")
    p.add_argument("-k", type=_positive_int, default=5)
    p.add_argument("--encoder", default=None, help="query encoder (default: the one the index's manifest records)")
    p.add_argument(
        "--pooling",
        default=None,
        help="query pooling: cls | mean | pooler (default: the manifest's; its normalisation always applies)",
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
    p = add("verify", cmd_index_verify, "check every checksum of a published version", parent=isub, config=False)
    p.add_argument("uri")
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
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = add("set-latest", cmd_index_set_latest, "verify a version, then point LATEST at it", parent=isub, config=False)
    p.add_argument("uri")
    p.add_argument("version")
    p.add_argument("--rollback", action="store_true", help="allow moving LATEST to an older version")
    p = add("rm", cmd_index_rm, "delete a version (never the one LATEST names)", parent=isub, config=False)
    p.add_argument("uri")
    p.add_argument("version")
    add("train", cmd_train, "train end to end with Ray Train")
    p = add("eval", cmd_eval, "EM/F1 and retrieval recall of a checkpoint")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--split", default="test", choices=["dev", "test", "changed"])
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
    p.add_argument("--detach", action="store_true", help="return after deploying instead of blocking")
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


def run_job(prefix: str, work: Callable[[], Any], show: Callable[[Any], str]) -> int:
    """What every ``jobs/*.py`` entry point does with its work: print ``show(result)`` and return 0;
    a failure a user can fix is one line on stderr (``<prefix>error: ...``) and exit code 2; a bug
    keeps its traceback."""
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - one line for what a user can fix, a traceback for a bug
        message = failure_message(exc)
        if message is None:
            raise
        print(f"{prefix}error: {message}", file=sys.stderr)
        return 2
    print(show(result))
    return 0


def failure_message(exc: BaseException) -> str | None:
    """One line naming the cause, or None for a bug (which keeps its traceback).

    Ray wraps what failed inside a task, an actor or a Train worker: the user's own error is dug
    out of the chain (or of the remote traceback's text) first.
    """
    from raggen.errors import find_user_error

    if isinstance(exc, RaggenError):
        return str(exc)
    inner = find_user_error(exc)
    if inner is not None:
        return str(inner)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        BotoCoreError = ClientError = ()  # type: ignore[assignment]
    if isinstance(exc, (BotoCoreError, ClientError)):
        return f"S3: {exc}"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename}: is a folder, expected a file"
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return f"{exc.filename or exc}: {exc.strerror or exc}"
    if isinstance(exc, (ValueError, OSError)):
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


if __name__ == "__main__":
    sys.exit(main())
