"""``sidetune fleet --config server.toml [--json]``: the operator's one screen of the fleet.

``sidetune fleet``            every device ever heard of: online or not, agent, backbone, adapter,
                              last round, jobs, rejections, cache and quota use;
``sidetune fleet jobs``       the newest jobs of every device, with their progress and losses;
``sidetune fleet device ID``  one device in full: its rounds, jobs (with the loss per epoch) and
                              its last rejections;
``sidetune fleet cohorts``    every cohort of the registry: members, samples pooled, adapter
                              version, last training loss, federated updates waiting.

``--json`` prints what the views read (side_server/fleet.py: :func:`fleet_snapshot` and friends),
unchanged. Only the server's config is needed (its Redis URL and password). Redis unreachable:
exit 69; a password Redis refuses: exit 78.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from schemas.errors import ConfigurationError, ExitCode, UnavailableError, UsageError
from schemas.logs import untrusted

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fleet", help="every device, its rounds, jobs and rejections (from the server's Redis)")
    _common(p, argparse.SUPPRESS)
    p.set_defaults(func=run, fleet_cmd="devices", config=None, json=False)
    cmds = p.add_subparsers(dest="fleet_cmd", metavar="VIEW")
    _common(cmds.add_parser("jobs", help="the newest jobs of every device, with progress and losses"),
            argparse.SUPPRESS)
    _common(cmds.add_parser("cohorts", help="every cohort: members, samples pooled, adapter version, last loss"),
            argparse.SUPPRESS)
    dev = cmds.add_parser("device", help="one device in full: rounds, jobs, losses, rejections")
    dev.add_argument("device_id", metavar="ID")
    _common(dev, argparse.SUPPRESS)


def _common(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--config", default=default, help="the server's TOML file (its redis_url and password)")
    p.add_argument("--json", action="store_true", default=default, help="print JSON instead")


def _redis(config: str | None) -> Any:
    import redis

    from schemas.settings import load_settings
    from side_server.config import ServerSettings
    from side_server.redis_client import connect

    settings = load_settings(ServerSettings, config)
    r = connect(settings)
    where = settings.redis_url.rpartition("@")[2]
    try:
        r.ping()
    except redis.AuthenticationError as e:
        raise ConfigurationError(f"redis at {where} refused the password: {e}") from None
    except redis.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise ConfigurationError(f"redis at {where} refused the password: {e}") from None
        raise UnavailableError(f"redis at {where}: {e}") from None
    except redis.RedisError as e:
        raise UnavailableError(f"redis at {where} unreachable: {e}") from None
    return r


def run(args: argparse.Namespace) -> int:
    import redis

    from side_server.fleet import device_detail, fleet_snapshot

    r = _redis(args.config)
    try:
        if args.fleet_cmd == "device":
            d = device_detail(r, args.device_id)
            if d is None:
                raise UsageError(f"no device {args.device_id!r} has been heard of (`sidetune fleet` lists them)")
            print(json.dumps(d, indent=1) if args.json else _device_text(d))
        elif args.fleet_cmd == "cohorts":
            cohorts = _cohorts(r, args.config)
            print(json.dumps(cohorts, indent=1) if args.json else _cohorts_text(cohorts))
        elif args.fleet_cmd == "jobs":
            jobs = fleet_snapshot(r)["jobs"]
            print(json.dumps(jobs, indent=1) if args.json else _jobs_text(jobs))
        else:
            snap = fleet_snapshot(r)
            print(json.dumps(snap, indent=1) if args.json else _fleet_text(snap))
    except redis.RedisError as e:
        raise UnavailableError(f"redis failed while reading the fleet: {e}") from None
    finally:
        r.close()
    return ExitCode.OK


def _cohorts(r: Any, config: str | None) -> list[dict[str, Any]]:
    from schemas.settings import load_settings
    from side_server.cohorts import CohortRegistry, cohort_snapshot
    from side_server.config import ServerSettings

    settings = load_settings(ServerSettings, config)
    if settings.cohorts_file is None:
        return []
    return cohort_snapshot(r, CohortRegistry(settings.cohorts_file))


# --------------------------------------------------------------------------- text


def _cohorts_text(cohorts: list[dict[str, Any]]) -> str:
    if not cohorts:
        return "no cohorts (the server's cohorts_file names none: `sidetune broker add-device ID --cohort NAME`)"
    rows = []
    for c in cohorts:
        m = c["metrics"]
        loss = m.get("train_loss")
        rows.append([untrusted(c["cohort"]), str(len(c["members"])), str(sum(c["samples_pooled"].values())),
                     f"v{c['adapter_version']}" if c["adapter_version"] else "-",
                     f"{loss:.4f}" if isinstance(loss, float) else "-", str(len(c["updates_waiting"])),
                     ", ".join(untrusted(d) for d in c["members"])])
    return _table(["COHORT", "MEMBERS", "POOLED", "ADAPTER", "LOSS", "UPDATES", "WHO"], rows)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - t)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _round_text(rd: dict[str, Any] | None) -> str:
    if rd is None:
        return "-"
    acc = f", acc {rd['holdout_accuracy']:.3f}" if rd.get("holdout_accuracy") is not None else ""
    return (f"#{rd['round']}: {rd['samples']} samples, {rd['forward_passes']} fwd, {_size(rd['bytes_up'])} up, "
            f"{_size(rd['bytes_down'])} down, {rd['seconds']:.1f} s{acc}")


def _job_states(jobs: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"


def _fleet_text(snap: dict[str, Any]) -> str:
    now = snap["generated_at"]
    devices = snap["devices"]
    if not devices:
        return "no device has been heard of yet (the workers record each device's status as it connects)"
    rows = []
    for d in devices:
        q = d["quota"]
        rows.append([
            d["device"], "online" if d["online"] else "offline", untrusted(d["agent_version"] or "-", 20),
            (d["backbone_fingerprint"] or "-")[:12], f"v{d['adapter_version']}", _ago(d["last_seen"], now),
            _round_text(d["last_round"]), _job_states(d["jobs"]),
            str(sum(d["rejections"].values())) if d["rejections"] else "0",
            f"{_size(q['cache_bytes']['used'])}/{_size(q['cache_bytes']['limit'])}",
            f"{q['jobs_in_flight']['used']}/{q['jobs_in_flight']['limit']}",
        ])
    out = [_table(["DEVICE", "STATUS", "AGENT", "BACKBONE", "ADAPTER", "LAST SEEN", "LAST ROUND", "JOBS",
                   "REJECTED", "CACHE", "IN FLIGHT"], rows)]
    online = sum(d["online"] for d in devices)
    out.append(f"\n{len(devices)} devices ({online} online), {len(snap['jobs'])} recent jobs, "
               f"{sum(x['count'] for x in snap['rejections_over_time'])} rejections in the last 24 h")
    for d in devices:
        for rej in d["last_rejections"][:3]:
            out.append(f"  {d['device']}: rejected {_ago(rej['at'], now)} ({rej['code']}): {untrusted(rej['reason'], 150)}")
    return "\n".join(out)


def _loss(j: dict[str, Any]) -> str:
    if not j["losses"]:
        return "-"
    last = j["losses"][-1]
    val = f" / {last['val_loss']:.4f}" if last.get("val_loss") is not None else ""
    return f"{last['train_loss']:.4f}{val}"


def _jobs_text(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs recorded"
    now = time.time()
    rows = []
    for j in jobs:
        took = (f"{j['finished_at'] - j['created_at']:.0f} s"
                if j.get("finished_at") and j.get("created_at") else "-")
        rows.append([j["device"], j["job_id"], j["state"], _ago(j["created_at"], now),
                     f"{j['epochs_done']}/{j['epochs'] or '?'}", str(j["samples"]), _loss(j), took,
                     f"v{j['adapter_version']}" if j.get("adapter_version") else untrusted(j.get("reason") or "", 60)])
    return _table(["DEVICE", "JOB", "STATE", "CREATED", "EPOCHS", "SAMPLES", "LOSS (train / val)", "TOOK",
                   "ADAPTER / REASON"], rows)


def _device_text(d: dict[str, Any]) -> str:
    now = time.time()
    q = d["quota"]
    out = [
        f"device {d['device']}: {'online' if d['online'] else 'offline'}, last seen {_ago(d['last_seen'], now)}",
        f"  agent {untrusted(d['agent_version'] or '-', 64)}, backbone {d['backbone_fingerprint'] or '-'}, adapter v{d['adapter_version']}",
        f"  cache {_size(d['cache_bytes'])} in {d['cache_samples']} samples (quota {_size(q['cache_bytes']['limit'])}); "
        f"jobs in flight {q['jobs_in_flight']['used']}/{q['jobs_in_flight']['limit']}",
        "", "rounds (as the board reported them):",
    ]
    if d["rounds"]:
        out.append(_table(["ROUND", "ENDED", "SAMPLES", "FORWARD", "UP", "DOWN", "SECONDS", "ACCURACY", "ADAPTER"], [
            [str(r["round"]), _ago(r["at"], now), str(r["samples"]), str(r["forward_passes"]), _size(r["bytes_up"]),
             _size(r["bytes_down"]), f"{r['seconds']:.1f}",
             f"{r['holdout_accuracy']:.3f}" if r.get("holdout_accuracy") is not None else "-",
             f"v{r['adapter_version']}"] for r in d["rounds"]]))
    else:
        out.append("  none reported yet")
    out += ["", "jobs:", _jobs_text(d["jobs"]) if d["jobs"] else "  none recorded"]
    for j in d["jobs"][:1]:
        if j["losses"]:
            out += ["", f"losses of {j['job_id']} (epoch: train / val):"]
            out += [f"  {x['epoch']:4d}: {x['train_loss']:.4f} / "
                    + (f"{x['val_loss']:.4f}" if x.get("val_loss") is not None else "-") for x in j["losses"]]
    out += ["", "rejections: " + (", ".join(f"{c} {n}" for c, n in sorted(d["rejections"].items())) or "none")]
    for rej in d["last_rejections"]:
        out.append(f"  {_ago(rej['at'], now)} ({rej['code']}): {untrusted(rej['reason'], 200)}")
    return "\n".join(out)
