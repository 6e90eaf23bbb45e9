"""``raggen train``, ``eval``, ``retrieve``, ``report`` and ``pretrain-reader``: training and measuring it."""

from __future__ import annotations

import argparse
import json

from raggen.cli.config_args import config_from_args
from raggen.errors import ConfigError


def cmd_train(args: argparse.Namespace) -> None:
    from raggen.app.training import run_training

    result = run_training(config_from_args(args))
    print(json.dumps(result, indent=2, default=str))


def cmd_eval(args: argparse.Namespace) -> None:
    from raggen.app.evaluation import evaluate_from_config

    print(
        json.dumps(
            evaluate_from_config(
                config_from_args(args),
                checkpoint=args.checkpoint,
                split=args.split or "test",
                qa=args.qa,
                limit=args.limit,
                out=args.out,
            ),
            indent=2,
        )
    )


def cmd_retrieve(args: argparse.Namespace) -> None:
    from raggen.app.retrieval import retrieve_from_config
    from raggen.train.retrieve import format_accuracy

    result = retrieve_from_config(
        config_from_args(args),
        args.qa,
        args.out,
        k=args.k,
        limit=args.limit,
        checkpoint=args.checkpoint,
        index_uri=args.index,
    )
    print(format_accuracy({k: v for k, v in result.items() if k.startswith("top")}, result["questions"]))
    print(f"wrote {result['out']} (index version {result['index_version']})")


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
