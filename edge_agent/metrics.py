"""The board agent's own metrics: a node_exporter textfile, and optionally a loopback port.

A board ships its metrics without opening a port: the agent rewrites ``<state_dir>/metrics.prom``
(Prometheus text format, atomically: schemas/files.py) when a figure changes, at most every
``REFRESH`` seconds, and at least once a minute (so node_exporter's ``node_textfile_mtime_seconds``
shows a stalled agent). Point node_exporter's textfile collector at it
(``--collector.textfile.directory=<state_dir>``, or a symlink into its folder). With
``metrics_port`` other than 0 the same figures are also served on ``127.0.0.1:<port>/metrics``.

The figures come from the ledger (rounds, forward passes, bytes, accuracy, errors: they survive a
restart) and from the agent (outbox depth, adapter version, connection):

* ``sidetune_edge_rounds_total`` [state]          rounds done and failed
* ``sidetune_edge_forward_passes_total``          forward passes of all rounds
* ``sidetune_edge_forward_passes_per_second``     the rate of the last round's forward passes
* ``sidetune_edge_bytes_up_total`` / ``_bytes_down_total``   message bytes of all rounds
* ``sidetune_edge_outbox_messages``               messages waiting to be sent
* ``sidetune_edge_new_samples``                   samples waiting for a round
* ``sidetune_edge_adapter_version``               the installed adapter (0: none)
* ``sidetune_edge_holdout_accuracy``              the last round's held-out accuracy (with ``holdout_file``)
* ``sidetune_edge_last_round_timestamp_seconds``  when the last round ended
* ``sidetune_edge_last_error_timestamp_seconds``  when the last round failed, and
  ``sidetune_edge_last_error_info`` [reason]      why (1, the reason as a label)
* ``sidetune_edge_connected``                     1 while connected to the broker
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.files import atomic_write
from schemas.logs import untrusted

log = logging.getLogger("sidetune.edge.metrics")

TEXTFILE = "metrics.prom"
#: Seconds between two readings of the ledger; the file is rewritten when a figure changed,
REFRESH = 5.0
#: ... and at least this often.
REWRITE = 60.0

__all__ = ["TEXTFILE", "EdgeMetrics", "figures"]


def figures(rounds: list[dict[str, Any]], *, outbox: int, new_samples: int, adapter_version: int, connected: bool,
            forward_rate: float | None) -> dict[str, Any]:
    """What the metrics say, from the ledger's rounds and the agent's state."""
    done = [r for r in rounds if r["state"] == "done"]
    failed = [r for r in rounds if r["state"] == "failed"]
    last_done = done[-1] if done else None
    last_failed = failed[-1] if failed else None
    return {
        "rounds_done": len(done), "rounds_failed": len(failed),
        "forward_passes": sum(int(r["forward_passes"] or 0) for r in rounds),
        "forward_rate": forward_rate,
        "bytes_up": sum(int(r["bytes_up"] or 0) for r in rounds),
        "bytes_down": sum(int(r["bytes_down"] or 0) for r in rounds),
        "outbox": outbox, "new_samples": new_samples, "adapter_version": adapter_version, "connected": connected,
        "holdout_accuracy": last_done.get("tuned_accuracy") if last_done else None,
        "last_round_at": last_done.get("finished") if last_done else None,
        "last_error_at": (last_failed.get("finished") or last_failed.get("started")) if last_failed else None,
        "last_error": untrusted(last_failed.get("detail") or "unknown", 200) if last_failed else None,
    }


class _Figures(Collector):
    def __init__(self) -> None:
        self.now: dict[str, Any] | None = None

    def collect(self) -> Iterable[Any]:
        f = self.now
        if f is None:
            return
        rounds = CounterMetricFamily("sidetune_edge_rounds", "Rounds ended, by state", labels=["state"])
        rounds.add_metric(["done"], f["rounds_done"])
        rounds.add_metric(["failed"], f["rounds_failed"])
        yield rounds
        yield CounterMetricFamily("sidetune_edge_forward_passes", "Forward passes of the backbone, all rounds",
                                  value=f["forward_passes"])
        if f["forward_rate"] is not None:
            yield GaugeMetricFamily("sidetune_edge_forward_passes_per_second",
                                    "Forward passes per second in the last round", value=f["forward_rate"])
        yield CounterMetricFamily("sidetune_edge_bytes_up", "Message bytes the rounds sent", value=f["bytes_up"])
        yield CounterMetricFamily("sidetune_edge_bytes_down", "Message bytes the rounds received",
                                  value=f["bytes_down"])
        yield GaugeMetricFamily("sidetune_edge_outbox_messages", "Messages waiting to be sent", value=f["outbox"])
        yield GaugeMetricFamily("sidetune_edge_new_samples", "Samples waiting for a round", value=f["new_samples"])
        yield GaugeMetricFamily("sidetune_edge_adapter_version", "Installed adapter version (0: none)",
                                value=f["adapter_version"])
        yield GaugeMetricFamily("sidetune_edge_connected", "1 while connected to the broker",
                                value=1 if f["connected"] else 0)
        if f["holdout_accuracy"] is not None:
            yield GaugeMetricFamily("sidetune_edge_holdout_accuracy", "Held-out accuracy after the last round",
                                    value=f["holdout_accuracy"])
        if f["last_round_at"] is not None:
            yield GaugeMetricFamily("sidetune_edge_last_round_timestamp_seconds", "When the last round ended",
                                    value=f["last_round_at"])
        if f["last_error"] is not None:
            yield GaugeMetricFamily("sidetune_edge_last_error_timestamp_seconds", "When the last round failed",
                                    value=f["last_error_at"] or 0.0)
            info = GaugeMetricFamily("sidetune_edge_last_error_info", "Why the last round failed", labels=["reason"])
            info.add_metric([f["last_error"]], 1)
            yield info


class EdgeMetrics:
    """The figures, the textfile, and the optional loopback port."""

    def __init__(self, state_dir: Path, port: int = 0) -> None:
        self.path = Path(state_dir) / TEXTFILE
        self.port = port
        self.registry = CollectorRegistry()
        self._figures = _Figures()
        self.registry.register(self._figures)
        self._server: Any = None
        self._read_at = float("-inf")
        self._written: tuple[bytes, float] | None = None

    def start(self) -> None:
        if self.port:
            self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def due(self) -> bool:
        return time.monotonic() - self._read_at >= REFRESH

    def update(self, figures_now: dict[str, Any]) -> bool:
        """Take new figures; rewrite the textfile if they changed (or a minute passed). True if written."""
        self._read_at = time.monotonic()
        self._figures.now = figures_now
        text = generate_latest(self.registry)
        if self._written is not None and self._written[0] == text and time.monotonic() - self._written[1] < REWRITE:
            return False
        try:
            atomic_write(self.path, text, mode=0o644)  # node_exporter runs as another user: readable, not secret
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)
            return False
        self._written = (text, time.monotonic())
        return True
