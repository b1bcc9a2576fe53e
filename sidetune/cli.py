"""The ``sidetune`` command: one entry, subcommands, one table of exit codes.

The table is ``schemas.errors.ExitCode`` (0 ok, 1 failed, 2 usage, 69 unavailable,
78 configuration: systemd's ``RestartPreventExitStatus=78`` stops there). Every
deliberate error is a ``SidetuneError`` that carries its code; it ends the command
with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.errors import ExitCode, MissingExtra, SidetuneError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = ExitCode.OK, ExitCode.FAILED, ExitCode.USAGE
EXIT_UNAVAILABLE, EXIT_CONFIG = ExitCode.UNAVAILABLE, ExitCode.CONFIG

#: The top-level module each extra brings: a command whose extra is missing says which to install.
_EXTRA_OF = {"torch": "server", "redis": "server", "transformers": "export", "gguf": "export",
             "onnx": "export", "onnxruntime": "edge", "tokenizers": "edge", "paho": "edge",
             "pydantic_settings": "edge"}


# ----------------------------------------------------------------- subcommands


def cmd_schema_vectors(args: argparse.Namespace) -> int:
    from schemas.vectors import write_vectors

    try:
        index = write_vectors(Path(args.dir))
    except OSError as e:
        raise UsageError(f"cannot write vectors to {args.dir}: {e.strerror or e}") from None
    for kind, entry in sorted(index.items()):
        print(f"{kind:12s} {entry['topic']:36s} {args.dir}/{entry['file']}")
    print(f"wrote {len(index)} vectors and {args.dir}/index.json")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from backbone_export import export_backbone

    manifest = export_backbone(args.model, Path(args.out), quantize=args.quantize)  # ExportError: exit 2
    print(f"exported {manifest.source} → {args.out} (fingerprint {manifest.fingerprint[:16]}…)")
    return EXIT_OK


def cmd_edge(args: argparse.Namespace) -> int:
    from edge_agent import cli as edge_cli

    return int(edge_cli.run(args))


def cmd_server(args: argparse.Namespace) -> int:
    from side_server import cli as server_cli

    return int(server_cli.run(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from sidetune.demo import run_demo

    return int(run_demo(args))


# ----------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidetune", description="Privacy-aware side-tuning for edge boards over MQTT.")
    p.add_argument("--version", action="version", version=f"sidetune {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    schema = sub.add_parser("schema", help="the wire contract").add_subparsers(dest="schema_cmd", required=True)
    vec = schema.add_parser("vectors", help="write one valid encoded payload per message kind")
    vec.add_argument("dir")
    vec.set_defaults(func=cmd_schema_vectors)

    exp = sub.add_parser("export", help="export a backbone to ONNX with pivot outputs")
    exp.add_argument("--model", required=True, help="smollm2-135m, a Hugging Face model folder, or a .gguf file")
    exp.add_argument("--out", required=True, help="output folder")
    from backbone_export.quantize import QUANT_CHOICES

    exp.add_argument("--quantize", choices=list(QUANT_CHOICES), default=None,
                     help="a quantized board graph (default: fp32); see the README's backbone benchmark")
    exp.set_defaults(func=cmd_export)

    from sidetune.fleet import register as add_fleet_command

    add_fleet_command(sub)
    from sidetune.bench import register as add_bench_commands

    add_bench_commands(sub)

    edge = sub.add_parser("edge", help="the board's agent")
    edge.set_defaults(func=cmd_edge, edge_parser=edge)
    _add_edge_commands(edge)

    server = sub.add_parser("server", help="the side server (one worker)")
    server.add_argument("--config", help="TOML file (environment SIDETUNE_SERVER_* overrides)")
    server.add_argument("--check", action="store_true", help="check the broker and Redis, then exit")
    server.set_defaults(func=cmd_server)

    demo = sub.add_parser("demo", help="everything on one machine, on the real model and data")
    _add_demo_options(demo)
    demo.set_defaults(func=cmd_demo)

    from sidetune.broker import register as add_broker_commands

    add_broker_commands(sub)
    from sidetune.cohort_cli import register as add_cohort_commands

    add_cohort_commands(sub)
    from sidetune.dashboard import register as add_dashboard_command

    add_dashboard_command(sub)
    from sidetune.task_cli import register as add_task_commands

    add_task_commands(sub)
    from sidetune.try_task import register as add_try_command

    add_try_command(sub)
    return p


def _add_edge_commands(edge: argparse.ArgumentParser) -> None:
    sub = edge.add_subparsers(dest="edge_cmd", required=True)
    for name, help_ in (("run", "run the agent daemon"), ("train", "ask the running agent for a round now"),
                        ("status", "whether the agent runs and is connected, its adapter, last round, outbox")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--config", required=True)
        if name == "status":
            c.add_argument("--json", action="store_true", help="print JSON instead")
    pr = sub.add_parser("predict", help="classify texts with the installed adapter")
    pr.add_argument("--config", required=True)
    pr.add_argument("texts", nargs="+")


def _add_demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--devices", type=int, default=2)
    demo.add_argument("--samples", type=int, default=1900, help="training samples per device by the last round")
    demo.add_argument("--holdout", type=int, default=500, help="held-out samples per device")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--backbone", default=None, help="exported backbone folder (exported on first use)")
    demo.add_argument("--workdir", default=None, help="where state and logs go (a temporary folder by default)")
    demo.add_argument("--json", default=None, help="write the results as JSON here")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave broker, Redis, worker, agents and dashboard up after the rounds, until Ctrl-C")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sidetune")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        try:
            return int(func(args))
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in _EXTRA_OF:
                raise
            raise MissingExtra(f"`sidetune {args.command}`", _EXTRA_OF[top], top) from None
    except SidetuneError as e:
        # One line, no traceback: what is wrong and (where it can) what to do.
        print(f"sidetune: error: {'; '.join(x.strip() for x in str(e).splitlines() if x.strip())}",
              file=sys.stderr)
        return int(e.exit_code)
    except BrokenPipeError:  # `sidetune ... | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("sidetune: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
