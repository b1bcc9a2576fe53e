"""One Flower federation on loopback, on Flower's deployment engine (no Ray), for bench cohort.

``run_federation`` starts ``flower-superlink`` (subprocess isolation, runtime installs off), one
``flower-supernode`` per board (``--node-config 'board=B partition="…npz" slots="…"'``, each with a
Flower home of its own), writes a Flower CLI config naming the SuperLink ``bench``, submits
``sidetune/bench/flower-app`` with ``flwr run APP bench --run-config …``, waits for the ServerApp's
``done.json``, reads each board's SuperNode and SuperExec CPU seconds and VmHWM from /proc, stops
every process it started (each in a process group of its own) and returns the per-board and
per-round figures (see sidetune/bench/fedlora.py for what the ClientApps and the ServerApp record).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.errors import SidetuneError

APP = Path(__file__).resolve().parent / "flower-app"
_ROOT = str(Path(__file__).resolve().parents[2])
_TICK = os.sysconf("SC_CLK_TCK")
Progress = Callable[[str], None]


class FederationFailed(SidetuneError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FederationFailed(f"{log.stem} exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FederationFailed(f"{log.stem} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _tail(log: Path, n: int = 6) -> str:
    try:
        return "; ".join(log.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def _proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds, VmHWM MB) of a live process from /proc; (0, 0) once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        hwm = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
        return cpu, hwm
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _env(home: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault(
        "OMP_WAIT_POLICY", "PASSIVE"
    )  # as bench compare's LoRA (sidetune/bench/measure.py)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def _toml_value(v: Any) -> str:
    return (
        json.dumps(v)
        if isinstance(v, str)
        else repr(v)
        if not isinstance(v, bool)
        else str(v).lower()
    )


def _run_id(stdout: str) -> int:
    try:
        return int(json.loads(stdout)["run-id"])
    except (ValueError, KeyError, TypeError) as e:
        raise FederationFailed(
            f"flwr run did not say which run it started: {stdout[-300:]!r}"
        ) from e


def _run_info(bin_dir: Path, cli_home: Path, threads: int, run_id: int) -> dict[str, Any]:
    """The run as ``flwr ls`` gives it: ``status`` (``running``, ``finished:completed`` ...),
    ``network-traffic`` (the SuperLink's own count of the run's bytes) ...; {} if it cannot say."""
    res = subprocess.run(
        [str(bin_dir / "flwr"), "ls", "bench", "--run-id", str(run_id), "--format", "json"],
        env=_env(cli_home, threads),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        runs = json.loads(res.stdout).get("runs", [])
        return dict(runs[0]) if runs else {}
    except (ValueError, AttributeError, TypeError):
        return {}


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group: SuperExec and any ClientApp left
        except ProcessLookupError:
            pass
        p.wait()


def run_federation(
    partitions: list[Path],
    run_cfg: dict[str, Any],
    work: Path,
    threads: int,
    progress: Progress,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Run the Flower app over ``partitions`` (one board each); per-board and per-round figures."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "server"
    for f in out.glob("*"):
        f.unlink()
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []

    def start(name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed after the processes stop
        logs.append(log)
        p = subprocess.Popen(
            cmd,
            env=_env(home, threads),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=work,
        )
        procs.append(p)
        return p

    try:
        link = start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            work / "home-superlink",
        )
        _wait_port(port, link, work / "superlink.log")
        nodes = []
        for b, part in enumerate(partitions):
            cfg = f'board={b} partition="{part}" slots="{work / "slots"}"'
            nodes.append(
                start(
                    f"supernode-{b}",
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        cfg,
                    ],
                    work / f"home-board-{b}",
                )
            )
        cli_home = work / "home-cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        full_cfg = {**run_cfg, "out-dir": str(out), "timeout-s": float(timeout_s)}
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in full_cfg.items())
        t_run = time.time()
        sub = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                str(APP),
                "bench",
                "--run-config",
                overrides,
                "--format",
                "json",
            ],
            env=_env(cli_home, threads),
            capture_output=True,
            text=True,
            cwd=work,
            timeout=300,
        )
        if sub.returncode != 0:
            raise FederationFailed(
                f"flwr run failed ({sub.returncode}): {(sub.stdout + sub.stderr)[-600:]}"
            )
        run_id = _run_id(sub.stdout)
        progress(f"flower: submitted run {run_id}")
        end = time.monotonic() + timeout_s
        seen, next_check = 0, time.monotonic() + 20
        while not (out / "done.json").exists():
            if (out / "error.json").exists():
                raise FederationFailed(
                    f"the ServerApp failed: {(out / 'error.json').read_text()[-600:]}"
                )
            if time.monotonic() > next_check:  # a run Flower ended without our ServerApp's word
                next_check = time.monotonic() + 30
                status = str(_run_info(bin_dir, cli_home, threads, run_id).get("status", ""))
                if status.startswith("finished") and not (out / "done.json").exists():
                    raise FederationFailed(
                        f"the Flower run ended ({status}) before its last round: "
                        f"{_tail(work / 'superlink.log')}"
                    )
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                log_path = Path(logs[procs.index(dead[0])].name)
                raise FederationFailed(
                    f"a Flower process exited ({dead[0].returncode}): {_tail(log_path)}"
                )
            if time.monotonic() > end:
                raise FederationFailed(
                    f"the Flower run did not finish within {timeout_s:.0f} s: "
                    f"{_tail(work / 'superlink.log')}"
                )
            rounds_file = out / "rounds.jsonl"
            n = len(rounds_file.read_text().splitlines()) if rounds_file.exists() else 0
            for r in range(seen, n):
                progress(f"flower: round {r} done ({time.time() - t_run:.0f} s since flwr run)")
            seen = max(seen, n)
            time.sleep(1.0)
        for n in range(seen, len((out / "rounds.jsonl").read_text().splitlines())):
            progress(f"flower: round {n} done")
        node_figs = []
        for p in nodes:  # the board's long-lived Flower processes: SuperNode and its SuperExec
            figs = [_proc_figures(p.pid)] + [_proc_figures(c) for c in _children(p.pid)]
            node_figs.append(
                {
                    "cpu_s": sum(c for c, _ in figs),
                    "peak_rss_mb": sum(h for _, h in figs),
                    "processes": len(figs),
                }
            )
        info: dict[str, Any] = {}
        for _ in range(10):  # the SuperLink's own traffic count, once the ServerApp has ended
            info = _run_info(bin_dir, cli_home, threads, run_id)
            if str(info.get("status", "")).startswith("finished"):
                break
            time.sleep(3)
    finally:
        _stop(procs)
        for log in logs:
            log.close()
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    fig = _figures(rounds, node_figs, t_run)
    fig["flower_run"] = {
        k: info.get(k) for k in ("run-id", "status", "network-traffic", "compute-time")
    }
    return fig


def _figures(
    rounds: list[dict[str, Any]], node_figs: list[dict[str, Any]], t_run: float
) -> dict[str, Any]:
    boards = len(node_figs)
    per = [
        {
            "board": b,
            "bytes_up": 0,
            "bytes_down": 0,
            "clientapp_cpu_s": 0.0,
            "clientapp_peak_rss_mb": 0.0,
            "wait_s": 0.0,
        }
        for b in range(boards)
    ]
    node_of: dict[int, int] = {}
    for r in rounds[1:]:  # round 0: the initial adapter, before any message
        for rep in r["replies"]:
            if rep.get("error"):
                raise FederationFailed(f"round {r['round']}: a ClientApp failed: {rep['error']}")
            b = int(rep["board"])
            node_of[int(rep["node"])] = b
            per[b]["bytes_up"] += int(rep["bytes_up"])
            per[b]["clientapp_cpu_s"] += float(rep["cpu-s"])
            per[b]["clientapp_peak_rss_mb"] = max(
                per[b]["clientapp_peak_rss_mb"], float(rep["peak-rss-mb"])
            )
            per[b]["wait_s"] += float(rep["wait-s"])
        if len(r["replies"]) != boards:
            raise FederationFailed(
                f"round {r['round']}: {len(r['replies'])} replies from {boards} boards"
            )
    for r in rounds[1:]:
        for node, nbytes in r["down"].items():
            per[node_of[int(node)]]["bytes_down"] += int(nbytes)
    for b, figs in enumerate(node_figs):
        per[b]["flower_processes_cpu_s"] = figs["cpu_s"]
        per[b]["device_cpu_s"] = per[b]["clientapp_cpu_s"] + figs["cpu_s"]
        per[b]["device_peak_rss_mb"] = per[b]["clientapp_peak_rss_mb"] + figs["peak_rss_mb"]
    return {
        "rounds": [
            {"round": r["round"], "adapter": r["adapter"], "since_run_s": r["time"] - t_run}
            for r in rounds
        ],
        "per_board": per,
        "time_to_adapter_s": rounds[-1]["time"] - t_run,
        "bytes_per_round_down": [statistics_mean(r["down"].values()) for r in rounds[1:]],
        "bytes_per_round_up": [
            statistics_mean([rep["bytes_up"] for rep in r["replies"]]) for r in rounds[1:]
        ],
    }


def statistics_mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0
