"""``sidetune bench ...``: the benchmarks, each a module of this package that reports numbers.

    backbone  -- ONNX Runtime fp32/int8 versus torch eager (latency, memory)
    accuracy  -- held-out accuracy of the backbone alone, the side network, labels in the clear
    privacy   -- each attack a curious server can run against each defence, and its cost
    fleet     -- N simulated boards against W real workers, a real broker and Redis (or a cluster)
    compare   -- sidetune against LoRA, full-activation offload and split learning: one table

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


def cmd_bench_compare(args: argparse.Namespace) -> int:
    import signal

    from edge_agent.backbone import BackboneError
    from edge_agent.task import TaskError
    from sidetune.bench.compare import QUICK_SIZES, run_compare
    from sidetune.data import DataError
    from sidetune.demo import _terminate, default_backbone_dir, default_home

    signal.signal(signal.SIGTERM, _terminate)  # `kill` stops the real round's services too

    quick = args.quick
    train = args.train if args.train is not None else (QUICK_SIZES[0] if quick else None)  # None: per data set
    holdout = args.holdout if args.holdout is not None else (QUICK_SIZES[1] if quick else None)
    seeds = args.seeds if args.seeds is not None else (2 if quick else 3)
    lora_epochs = args.lora_epochs if args.lora_epochs is not None else (1 if quick else 2)
    if min(1 if train is None else train, 1 if holdout is None else holdout, seeds) < 1 or lora_epochs < 0:
        raise UsageError("--train, --holdout and --seeds must be positive, --lora-epochs not negative")
    backbone = Path(args.backbone) if args.backbone else default_backbone_dir()
    if not (backbone / "manifest.json").exists():
        raise UsageError(f"{backbone} holds no exported backbone: run `sidetune demo` once, or "
                         f"`sidetune export --model smollm2-135m --out {backbone}`")
    try:
        run_compare(backbone, args.task or ["chat", "news"], Path(args.out), train=train, holdout=holdout, seeds=seeds,
                    lora_epochs=lora_epochs, live=not args.no_round, int8=not args.no_int8,
                    ingest_samples=500 if quick else 2000, cache_dir=default_home() / "features",
                    progress=lambda m: print(f"[compare] {m}", flush=True))
    except (BackboneError, TaskError, DataError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_bench_cohort(args: argparse.Namespace) -> int:
    import signal

    from sidetune.bench.cohort import run_cohort
    from sidetune.bench.shards import KINDS
    from sidetune.demo import _terminate, default_backbone_dir, default_home

    signal.signal(signal.SIGTERM, _terminate)  # `kill` stops the real round's services too
    backbone = Path(args.backbone) if args.backbone else default_backbone_dir()
    if not (backbone / "manifest.json").exists():
        raise UsageError(f"{backbone} holds no exported backbone: run `sidetune demo` once, or "
                         f"`sidetune export --model smollm2-135m --out {backbone}`")
    kinds = args.shards or list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UsageError(f"unknown --shards {bad[0]!r}: {', '.join(KINDS)}")
    quick = args.quick
    run_cohort(backbone, Path(args.out), boards=args.boards or (2 if quick else 8),
               per_board=args.per_board or (40 if quick else 250), holdout=args.holdout or (60 if quick else 400),
               alpha=args.alpha, kinds=kinds, epochs=args.epochs or (5 if quick else 20), quick=quick,
               live=not args.no_round, baselines=not args.no_baselines, cache_dir=default_home() / "features",
               progress=lambda m: print(f"[cohort] {m}", flush=True))
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
    bc = bench.add_parser("compare", help="sidetune against on-device LoRA, full-activation offload and split "
                                          "learning: accuracy, bytes, device CPU and memory, time to adapter")
    bc.add_argument("--task", action="append", default=None,
                    help="chat or plain (Rotten Tomatoes), news (news outlets, 7 classes) or a task TOML; "
                         "repeatable; default: chat and news")
    bc.add_argument("--train", type=int, default=None, help="training samples per task (default: 1600 of Rotten Tomatoes, 500 of the news; --quick 200)")
    bc.add_argument("--holdout", type=int, default=None, help="held-out samples per task (default: 1000 of Rotten Tomatoes, 400 of the news; "
                         "--quick 200)")
    bc.add_argument("--seeds", type=int, default=None,
                    help="device secrets and training seeds for the side networks (default 3; --quick 2)")
    bc.add_argument("--lora-epochs", type=int, default=None,
                    help="most LoRA epochs; it stops earlier once one does not improve (default 2; --quick 1; 0: skip)")
    bc.add_argument("--out", default="bench-compare", help="folder for results.json, report.md and the plots")
    bc.add_argument("--backbone", default=None, help="an exported fp32 backbone folder (the demo's by default)")
    bc.add_argument("--quick", action="store_true", help="a smaller run to try it out (a few minutes)")
    bc.add_argument("--no-round", action="store_true", help="skip the real round (no time to adapter, no server rates)")
    bc.add_argument("--no-int8", action="store_true", help="skip the int8 graph")
    bc.set_defaults(func=cmd_bench_compare)
    bh = bench.add_parser("cohort", help="fleet learning (pooled and federated cohorts) against each board alone, "
                                         "on-device LoRA, Flower's federated LoRA and central LoRA")
    bh.add_argument("--out", default="bench-cohort", help="folder for results.json, report.md and the plot")
    bh.add_argument("--backbone", default=None, help="an exported fp32 backbone folder (the demo's by default)")
    bh.add_argument("--boards", type=int, default=None, help="boards in the cohort (default 8; --quick 2)")
    bh.add_argument("--per-board", type=int, default=None, help="training samples per board (default 250; --quick 40)")
    bh.add_argument("--holdout", type=int, default=None, help="held-out samples every board is scored on (default 400)")
    bh.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α of the label-skewed shards (default 0.5)")
    bh.add_argument("--shards", action="append", default=None, help="iid and/or dirichlet (default both)")
    bh.add_argument("--epochs", type=int, default=None, help="side-network epochs (default 20; --quick 5)")
    bh.add_argument("--quick", action="store_true", help="everything, small, in minutes")
    bh.add_argument("--no-round", action="store_true", help="skip the real pooled round (agents + worker)")
    bh.add_argument("--no-baselines", action="store_true", help="skip the LoRA and Flower rows")
    bh.set_defaults(func=cmd_bench_cohort)

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
