"""``sidetune bench ...``: the benchmarks, each a module of this package that reports numbers.

    backbone  -- ONNX Runtime fp32/int8 versus torch eager (latency, memory)
    accuracy  -- held-out accuracy of the backbone alone, the side network, labels in the clear
    privacy   -- each attack a curious server can run against each defence, and its cost
    fleet     -- N simulated boards against W real workers, a real broker and Redis (or a cluster)

Each module keeps its heavy imports inside its functions; ``register`` only builds the parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.errors import ExitCode, UsageError

EXIT_OK = ExitCode.OK


def cmd_bench_backbone(args: argparse.Namespace) -> int:
    from sidetune.bench.backbone import run_bench

    run_bench(Path(args.backbone), json_path=Path(args.json) if args.json else None)  # ExportError: exit 2
    return EXIT_OK


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from edge_agent.backbone import BackboneError
    from edge_agent.task import TaskError
    from sidetune.bench.accuracy import run_accuracy_bench
    from sidetune.data import DataError
    from sidetune.demo import default_backbone_dir, default_home

    if min(args.train, args.holdout, args.splits, args.epochs) < 1:
        raise UsageError("--train, --holdout, --splits and --epochs must be positive")
    if args.noise is not None and not 0 <= args.noise <= 10:
        raise UsageError("--noise must be between 0 and 10")
    backbone = Path(args.backbone) if args.backbone else default_backbone_dir()
    if not (backbone / "manifest.json").exists():
        raise UsageError(f"{backbone} holds no exported backbone: run `sidetune demo` once, or "
                       f"`sidetune export --model smollm2-135m --out {backbone}`")
    try:
        run_accuracy_bench(backbone, args.task or ["chat", "plain"], train=args.train, holdout=args.holdout,
                           splits=args.splits, epochs=args.epochs, cache_dir=default_home() / "features",
                           noise_std=args.noise,
                           json_path=Path(args.json) if args.json else None,
                           progress=lambda m: print(f"[bench] {m}", flush=True))
    except (BackboneError, TaskError, DataError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_bench_privacy(args: argparse.Namespace) -> int:
    from edge_agent.backbone import BackboneError
    from edge_agent.task import TaskError
    from sidetune.bench.privacy import run_privacy_bench
    from sidetune.data import DataError
    from sidetune.demo import default_backbone_dir, default_home

    if min(args.public, args.train, args.holdout, args.splits, args.epochs) < 1:
        raise UsageError("--public, --train, --holdout, --splits and --epochs must be positive")
    backbone = Path(args.backbone) if args.backbone else default_backbone_dir()
    if not (backbone / "manifest.json").exists():
        raise UsageError(f"{backbone} holds no exported backbone: run `sidetune demo` once, or "
                         f"`sidetune export --model smollm2-135m --out {backbone}`")
    try:
        run_privacy_bench(backbone, args.task, Path(args.out), public=args.public, train=args.train,
                          holdout=args.holdout, splits=args.splits, epochs=args.epochs,
                          cache_dir=default_home() / "features", progress=lambda m: print(f"[bench] {m}", flush=True))
    except (BackboneError, TaskError, DataError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    from sidetune.bench.fleet import run_fleet_bench

    run_fleet_bench(args.boards, args.samples, args.workers, args.cluster,
                    json_path=Path(args.json) if args.json else None,
                    backbone_dir=Path(args.backbone) if args.backbone else None,
                    progress=lambda m: print(f"[fleet] {m}", flush=True))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its subcommands to the ``sidetune`` parser."""
    bench = sub.add_parser("bench", help="benchmarks that report numbers").add_subparsers(dest="bench_cmd", required=True)
    bb = bench.add_parser("backbone", help="ONNX Runtime fp32/int8 vs torch eager: latency and memory")
    bb.add_argument("--backbone", required=True, help="an exported backbone folder")
    bb.add_argument("--json", help="also write the results here")
    bb.set_defaults(func=cmd_bench_backbone)
    ba = bench.add_parser("accuracy", help="held-out accuracy: backbone alone, side network, labels in the clear")
    ba.add_argument("--backbone", default=None, help="an exported backbone folder (the demo's by default)")
    ba.add_argument("--task", action="append", default=None,
                    help="chat (the demo's prompt), plain (Review: ... Sentiment:) or a task TOML with classes "
                         "fresh and rotten; repeatable; default: chat and plain")
    ba.add_argument("--train", type=int, default=1600, help="training samples per split")
    ba.add_argument("--holdout", type=int, default=1000, help="held-out samples per split")
    ba.add_argument("--splits", type=int, default=5, help="random splits to average over")
    ba.add_argument("--epochs", type=int, default=20)
    ba.add_argument("--noise", type=float, default=None,
                    help="std of the noise in the K−C extra target dimensions (the agent's noise_std by default)")
    ba.add_argument("--json", help="also write the results here")
    ba.set_defaults(func=cmd_bench_accuracy)
    bp = bench.add_parser("privacy", help="each attack a curious server can run against each defence, and its cost")
    bp.add_argument("--task", default="chat",
                    help="chat (the demo's prompt), plain (Review: ... Sentiment:) or a task TOML with classes "
                         "fresh and rotten")
    bp.add_argument("--out", default="bench-privacy", help="folder for results.json, report.md and plot.svg")
    bp.add_argument("--backbone", default=None, help="an exported backbone folder (the demo's by default)")
    bp.add_argument("--public", type=int, default=800, help="the server's own labelled reviews per split")
    bp.add_argument("--train", type=int, default=1200, help="the device's training samples per split")
    bp.add_argument("--holdout", type=int, default=600, help="the device's held-out samples per split")
    bp.add_argument("--splits", type=int, default=3, help="random splits to average over")
    bp.add_argument("--epochs", type=int, default=20)
    bp.set_defaults(func=cmd_bench_privacy)
    bf = bench.add_parser("fleet", help="N simulated boards, each a full round, against W real workers, a real "
                                        "mosquitto and Redis (or a Redis Cluster): ingest, jobs, losses, memory")
    bf.add_argument("--boards", type=int, default=100, help="simulated boards, each with its own device account")
    bf.add_argument("--samples", type=int, default=200, help="samples in each board's round")
    bf.add_argument("--workers", type=int, default=1, help="`sidetune server` worker processes")
    bf.add_argument("--cluster", action="store_true", help="a Redis Cluster (3 masters + 3 replicas) instead of "
                                                           "one redis-server")
    bf.add_argument("--json", help="also write the results here")
    bf.add_argument("--backbone", default=None,
                    help="an exported backbone folder (the demo's SmolLM2 by default, else a tiny one)")
    bf.set_defaults(func=cmd_bench_fleet)
