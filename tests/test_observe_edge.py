"""What the board reports about itself: the round summary in its status (wire contract and vectors),
JSON log lines, and the agent's metrics textfile. Runs with the edge extra alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import EdgeMetrics, figures
from schemas import WireError, decode, encode
from schemas.status import DeviceStatus, RoundSummary
from schemas.vectors import example_messages
from tests.wire_helpers import join, split

pytestmark = pytest.mark.edge

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- status: the round summary


def test_the_status_vector_carries_the_last_round():
    status = example_messages()["status"]
    assert isinstance(status, DeviceStatus) and status.last_round is not None
    t, p = encode(status)
    back = decode(t, p)
    assert isinstance(back, DeviceStatus) and back == status
    assert back.last_round == RoundSummary(round=1, samples=4, forward_passes=4, bytes_up=1234, bytes_down=567,
                                           seconds=2.5, holdout_accuracy=0.75, adapter_version=1,
                                           finished_at=1763999999.0)
    body = split(p)[0]["body"]
    assert body["last_round"]["holdout_accuracy"] == 0.75 and body["last_round"]["bytes_up"] == 1234


def test_a_status_from_before_the_round_summary_still_decodes():
    t, p = encode(example_messages()["status"])
    header, blobs = split(p)
    for old in ("last_round", "backbone_fingerprint"):  # what a board of an older release sends
        del header["body"][old]
        m = decode(t, join(header, blobs))
        assert isinstance(m, DeviceStatus) and m.last_round is None and m.adapter_version == 1


def test_a_status_without_a_round_yet():
    m = example_messages()["status"].model_copy(update={"last_round": None})
    t, p = encode(m)
    assert split(p)[0]["body"]["last_round"] is None
    assert decode(t, p) == m


@pytest.mark.parametrize("field,value,match", [
    ("holdout_accuracy", 1.5, "less than or equal to 1"),
    ("bytes_up", -1, "greater than or equal to 0"),
    ("round", 0, "greater than or equal to 1"),
    ("seconds", "NaN", "finite|number"),
    ("surprise", 1, "Extra inputs are not permitted"),
])
def test_a_bad_round_summary_is_invalid(field, value, match):
    t, p = encode(example_messages()["status"])
    header, blobs = split(p)
    header["body"]["last_round"][field] = value
    with pytest.raises(WireError, match=match) as e:
        decode(t, join(header, blobs))
    assert e.value.code == "invalid"


# --------------------------------------------------------------------------- logs


def _log_lines(fmt: str, env: dict[str, str] | None = None) -> list[str]:
    code = ("import logging; from schemas.logs import setup_logging; "
            f"setup_logging('INFO', {fmt!r}, device='board-1'); "
            "log = logging.getLogger('sidetune.server'); "
            "log.info('job %s: adapter v%d', 'j-1\\nFAKE LINE', 3, extra={'device': 'dev-7', 'job': 'j-1'}); "
            "log.warning('plain'); log.debug('hidden')\n"
            "try:\n 1/0\nexcept ZeroDivisionError:\n log.exception('failed %s', 'x')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_json_logs_are_one_object_per_line():
    lines = _log_lines("json")
    assert len(lines) == 3  # the DEBUG line is below the level; the newline in an argument starts no line
    first, second, third = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message", "device", "job"}
    assert first["level"] == "INFO" and first["logger"] == "sidetune.server"
    assert first["message"] == "job j-1\\nFAKE LINE: adapter v3"  # escaped, as in the text format
    assert (first["device"], first["job"]) == ("dev-7", "j-1")  # from extra=
    assert (second["device"], second["job"]) == ("board-1", None)  # the process's own device
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert third["level"] == "ERROR" and third["message"] == "failed x"
    assert "ZeroDivisionError" in third["exception"]


def test_json_logs_under_journald_keep_the_level_prefix():
    lines = _log_lines("json", {"JOURNAL_STREAM": "8:1234"})
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert json.loads(lines[1][3:])["message"] == "plain"


def test_text_logs_are_unchanged():
    lines = _log_lines("text")
    assert " sidetune.server INFO job j-1\\nFAKE LINE: adapter v3" in lines[0]
    assert not lines[0].startswith("{")


# --------------------------------------------------------------------------- the board's metrics textfile


def _parse(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


ROUNDS = [
    {"round": 1, "state": "done", "forward_passes": 300, "bytes_up": 1000, "bytes_down": 200, "tuned_accuracy": 0.8,
     "finished": 100.0, "started": 90.0, "detail": None},
    {"round": 2, "state": "failed", "forward_passes": 50, "bytes_up": 10, "bytes_down": 0, "tuned_accuracy": None,
     "finished": 120.0, "started": 110.0, "detail": "job rejected: \"quota\"\nsecond line"},
    {"round": 3, "state": "sent", "forward_passes": 7, "bytes_up": 5, "bytes_down": 1, "tuned_accuracy": None,
     "finished": None, "started": 130.0, "detail": None},
]


def test_metrics_textfile(tmp_path):
    m = EdgeMetrics(tmp_path)
    f = figures(ROUNDS, outbox=4, new_samples=9, adapter_version=1, connected=True, forward_rate=123.5)
    assert m.update(f)
    path = tmp_path / "metrics.prom"
    assert path.stat().st_mode & 0o777 == 0o644
    got = _parse(path.read_text())
    assert got["sidetune_edge_rounds_total{state=done}"] == 1
    assert got["sidetune_edge_rounds_total{state=failed}"] == 1
    assert got["sidetune_edge_forward_passes_total"] == 357
    assert got["sidetune_edge_forward_passes_per_second"] == 123.5
    assert got["sidetune_edge_bytes_up_total"] == 1015 and got["sidetune_edge_bytes_down_total"] == 201
    assert got["sidetune_edge_outbox_messages"] == 4 and got["sidetune_edge_new_samples"] == 9
    assert got["sidetune_edge_adapter_version"] == 1 and got["sidetune_edge_connected"] == 1
    assert got["sidetune_edge_holdout_accuracy"] == 0.8
    assert got["sidetune_edge_last_round_timestamp_seconds"] == 100.0
    assert got["sidetune_edge_last_error_timestamp_seconds"] == 120.0
    [info] = [k for k in got if k.startswith("sidetune_edge_last_error_info")]
    assert "second line" in info and "\n" not in info
    # the same figures: not written again (an SD card wears); changed ones are
    before = path.stat().st_mtime_ns
    assert not m.update(f)
    assert m.update({**f, "outbox": 0})
    assert _parse(path.read_text())["sidetune_edge_outbox_messages"] == 0 and path.stat().st_mtime_ns >= before


def test_metrics_before_any_round(tmp_path):
    m = EdgeMetrics(tmp_path)
    m.update(figures([], outbox=0, new_samples=0, adapter_version=0, connected=False, forward_rate=None))
    got = _parse((tmp_path / "metrics.prom").read_text())
    assert got["sidetune_edge_rounds_total{state=done}"] == 0 and got["sidetune_edge_connected"] == 0
    assert not any(k.startswith(("sidetune_edge_holdout", "sidetune_edge_last_error", "sidetune_edge_forward_passes_per"))
                   for k in got)
