"""`sidetune dashboard` in headless Chromium while a real round runs; its bind and token rules.

The dashboard runs as its own process (as systemd runs it), reading the Redis a real worker
writes while two in-process agents on the tiny backbone train through a real mosquitto. The
page is Debian's chromium, driven by Selenium through /usr/bin/chromedriver (nothing is
downloaded: Selenium Manager is never asked, the driver's path is given). Screenshots go to the
test's tmp_path; with SIDETUNE_DASHBOARD_PNG=PATH the wide one is also copied there (that is
how docs/dashboard.png is made).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import EdgeAgent
from schemas import HyperParams, topic
from sidetune.services import SERVER_USER, free_port
from tests.loop_helpers import (
    AgentThread,
    clear_device,
    edge_settings,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EPOCHS = 12
TOKEN = "t0ken-" + "x" * 26


class DashboardProcess:
    """``sidetune dashboard`` as a child process; ``url`` once it listens."""

    def __init__(self, workdir: Path, redis_url: str, *args: str, port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "server.toml"
        self.config.write_text(f"redis_url = {json.dumps(redis_url)}\n")
        self.port = port or free_port()
        self.log = workdir / "dashboard.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidetune.cli", "dashboard", "--config", str(self.config), "--port", str(self.port),
             "--interval", "0.2", *args], stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}/"
        wait_for(lambda: self.proc.poll() is not None or "dashboard on" in self.log.read_text(), 30,
                 "the dashboard to listen")
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} not found: apt-get install {pkg} (scripts/setup does)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
              "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # a driver path: no Selenium Manager
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def other_device_account(device_account: tuple[str, str], broker_accounts: dict[str, str]) -> tuple[str, str]:
    """A second pool account, the one after ``device_account``'s (taken from the same pool)."""
    from conftest import _pool  # type: ignore[import-not-found]  # pytest loads tests/conftest.py as "conftest"

    user = next(_pool)
    return user, broker_accounts[user]


def dom(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


#: What the page shows, read from the rendered DOM (not from the API).
READ_PAGE = """
const rows = {};
for (const tr of document.querySelectorAll('#fleet tbody tr')) {
  rows[tr.dataset.device] = {state: tr.querySelector('.state').textContent,
                             adapter: tr.querySelector('[data-label=adapter]').textContent,
                             accuracy: tr.querySelector('.acc').textContent,
                             rejections: tr.querySelector('[data-label=rejections] span').firstChild.textContent};
}
const jobs = [...document.querySelectorAll('#jobs .job')].map(j => ({
  device: j.dataset.device, job: j.dataset.job, state: j.dataset.state, done: Number(j.dataset.epochsDone),
  train: [...j.querySelectorAll('circle.pt.train')].map(c => Number(c.dataset.x)),
  val: [...j.querySelectorAll('circle.pt.val')].map(c => Number(c.dataset.x))}));
const rejected = {bars: document.querySelectorAll('#rejections rect.col').length,
  last: [...document.querySelectorAll('#last-rejections tbody tr')].map(tr => [...tr.cells].map(c => c.textContent))};
return {rows, jobs, rejected, updates: Number(document.body.dataset.updates), marker: window.__sameDocument || null,
        error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent};
"""


def test_the_page_follows_a_round_live(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts,
                                       device_account, other_device_account, browser, mqtt_client):
    devices = dict([device_account, other_device_account])
    clear_status(mqtt_client, devices)  # an earlier test's agent on these accounts left its round in its status
    wid = f"dash-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                                          share_group=wid))
    dash = DashboardProcess(tmp_path / "dash", redis_url)
    agents: list[AgentThread] = []
    try:
        browser.set_window_size(1280, 1000)
        browser.get(dash.url)
        wait_for(lambda: dom(browser, READ_PAGE)["updates"] >= 1, 20, "the first render")
        dom(browser, "window.__sameDocument = 'loaded once';")  # a reload would lose it
        first = dom(browser, READ_PAGE)  # (a device account an earlier test used may be there: its retained status)

        for dev, pw in devices.items():
            (tmp_path / dev).mkdir()
            holdout = write_jsonl(tmp_path / f"holdout-{dev}.jsonl", make_samples(60, seed=7))
            s = edge_settings(tmp_path / dev, tiny_backbone, mosquitto, dev, pw, holdout_file=holdout,
                              hyper=HyperParams(epochs=EPOCHS, lr=3e-3, batch_size=32))
            agents.append(AgentThread(EdgeAgent(s)))
        running = [a.__enter__() for a in agents]
        # every device appears, online, without a reload
        wait_for(lambda: all(dom(browser, READ_PAGE)["rows"].get(d, {}).get("state") == "online" for d in devices),
                 30, "both devices online on the page")

        for i, agent in enumerate(running):
            request_round(agent, make_samples(160, seed=i + 1))
        seen: list[dict[str, Any]] = []

        def finished() -> bool:
            page = dom(browser, READ_PAGE)
            seen.append(page)
            mine = [j for j in page["jobs"] if j["device"] in devices]
            return len(mine) == 2 and all(j["state"] == "done" and j["done"] == EPOCHS for j in mine) \
                and all(round_state(a, 1) for a in running)

        wait_for(finished, 180, "both jobs done on the page", poll=0.25)
        for agent in running:
            assert round_state(agent, 1)["state"] == "done"  # type: ignore[index]

        page = seen[-1]
        assert page["marker"] == "loaded once" and page["error"] is None
        assert page["updates"] > first["updates"] + 2
        # every state the page rendered: each job card has one point per finished epoch, 1, 2, ... n
        for p in seen:
            for j in p["jobs"]:
                assert j["train"] == list(range(1, j["done"] + 1)) and j["val"] in ([], j["train"]), j
        # the page showed the jobs while they trained (a job card before it was done)
        assert any(j["state"] != "done" for p in seen for j in p["jobs"] if j["device"] in devices), \
            "the page never showed a job before it was done"
        # the curve is the job's record: the API (side_server.fleet.job_detail) holds the same epochs
        for j in (j for j in page["jobs"] if j["device"] in devices):
            status, body = get(f"{dash.url}api/jobs/{j['device']}/{j['job']}")
            detail = json.loads(body)
            assert status == 200 and [x["epoch"] for x in detail["losses"]] == list(range(1, EPOCHS + 1))

        for dev in devices:
            status, body = get(f"{dash.url}api/devices/{dev}")
            assert status == 200 and [r["round"] for r in json.loads(body)["rounds"]] == [1]
        # each device: adapter v1 and the held-out accuracy its round reported
        def shows_rounds() -> dict[str, Any] | None:
            rows = dom(browser, READ_PAGE)["rows"]
            return rows if all(rows[d]["adapter"] == "v1" and rows[d]["accuracy"] != "–" for d in devices) else None

        rows = wait_for(shows_rounds, 30, "adapter v1 and accuracies on the page")
        for dev, agent in zip(devices, running):
            acc = round_state(agent, 1)["tuned_accuracy"]  # type: ignore[index]
            assert float(rows[dev]["accuracy"]) == pytest.approx(acc, abs=5e-4)  # type: ignore[index]
        # every device of the snapshot is on the page, with its state
        snap = json.loads(get(dash.url + "api/fleet")[1])
        rows = dom(browser, READ_PAGE)["rows"]
        assert {d["device"]: "online" if d["online"] else "offline" for d in snap["devices"]} == \
            {d: r["state"] for d, r in rows.items()}

        # a message the server rejects: counted on the device's row, in the chart and the latest ones
        dev = next(iter(devices))
        mqtt_client(dev, devices[dev]).publish(topic(dev, "jobs"), b"not a message", qos=1).wait_for_publish(5)

        def rejected() -> dict[str, Any] | None:
            page = dom(browser, READ_PAGE)
            return page if page["rows"][dev]["rejections"] == "1" and page["rejected"]["bars"] >= 1 else None

        page = wait_for(rejected, 30, "the rejection on the page")  # type: ignore[assignment]
        (when, who, code, reason), = page["rejected"]["last"]
        assert who == dev and code and reason, page["rejected"]

        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        if os.environ.get("SIDETUNE_DASHBOARD_PNG"):
            shutil.copy(tmp_path / "dashboard.png", os.environ["SIDETUNE_DASHBOARD_PNG"])
        # a phone: one column, nothing wider than the screen
        browser.set_window_size(390, 844)
        wait_for(lambda: dom(browser, "return document.documentElement.scrollWidth <= window.innerWidth"), 5,
                 "the page to fit a phone's width")
        browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    finally:
        for a in agents:
            a.__exit__(None, None, None)
        assert dash.stop() == 0, dash.log.read_text()
        worker.stop()
        for dev in devices:
            clear_device(mqtt_client, dev, [wid])
        clear_status(mqtt_client, devices)


def clear_status(mqtt_client: Callable[..., Any], devices: dict[str, str]) -> None:
    """No retained status left on the devices' accounts (it names their last round)."""
    for dev, pw in devices.items():
        mqtt_client(dev, pw).publish(topic(dev, "status"), b"", qos=1, retain=True).wait_for_publish(5)


# ------------------------------------------------------------------ bind and token rules


def test_a_non_loopback_address_needs_a_token(tmp_path, capsys):
    from sidetune.cli import main
    from sidetune.dashboard.server import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "192.0.2.7", "::", "dashboard.example.lan", "")))
    conf = tmp_path / "server.toml"
    conf.write_text('redis_url = "redis://127.0.0.1:1/0"\n')  # never reached: the bind is refused first
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    for extra, says in (([], "needs a bearer token"), (["--token-file", str(short)], "shorter than 16"),
                        (["--token-file", str(tmp_path / "none")], "does not exist")):
        assert main(["dashboard", "--config", str(conf), "--host", "0.0.0.0", *extra]) == 78
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    # loopback without a token, but Redis unreachable: 69 (systemd restarts it), one line
    p = subprocess.run([sys.executable, "-m", "sidetune.cli", "dashboard", "--config", str(conf), "--port",
                        str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 69 and "redis" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_the_token_guards_every_route(tmp_path, redis_url, browser):
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(TOKEN + "\n")
    dash = DashboardProcess(tmp_path, redis_url, "--host", "0.0.0.0", "--token-file", str(token_file))
    try:
        base = dash.url
        for path in ("", "api/fleet", "api/events", "healthz", "api/devices/x", "api/jobs/x/y", "nothing"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, "wrong-token-wrong-token")[0] == 401, path
            assert get(base + path, TOKEN + "x")[0] == 401, path
        assert get(base + "?token=wrong-token-wrong-token")[0] == 401
        assert get(base + "api/fleet?token=" + TOKEN)[0] == 401  # the query is for the page only
        status, body = get(base + "api/fleet", TOKEN)
        assert status == 200 and set(json.loads(body)) >= {"generated_at", "devices", "jobs", "rejections_over_time"}
        assert get(base + "healthz", TOKEN) == (200, b'{"ok": true}')
        assert get(base + "api/devices/nobody", TOKEN)[0] == 404
        status, page = get(base, TOKEN)
        assert status == 200 and b"<svg" not in page[:200] and b"sidetune fleet" in page

        # the page, given the token once in its address, keeps it and follows the events
        browser.get(base + "?token=" + TOKEN)
        wait_for(lambda: dom(browser, "return document.getElementById('live').textContent") == "live", 20,
                 "the event stream to be live with the token")
        assert "token" not in browser.current_url
        assert dom(browser, "return sessionStorage.getItem('sidetune-token')") == TOKEN
        assert dom(browser, "return document.getElementById('error').hidden") is True
    finally:
        assert dash.stop() == 0, dash.log.read_text()


def test_redis_going_away_shows_on_the_page_and_passes(tmp_path, redis_server, redis_url, browser):
    dash = DashboardProcess(tmp_path, redis_url)
    try:
        browser.get(dash.url)
        wait_for(lambda: dom(browser, "return document.getElementById('live').textContent") == "live", 20, "live")
        redis_server.stop()
        error: Callable[[], Any] = lambda: dom(browser, "const e = document.getElementById('error'); "  # noqa: E731
                                                         "return e.hidden ? null : e.textContent")
        assert "redis" in str(wait_for(error, 30, "the page to say Redis is away"))
        assert get(dash.url + "healthz")[0] == 503 and get(dash.url + "api/fleet")[0] == 503
        redis_server.start()
        wait_for(lambda: error() is None, 30, "the page to recover")
        assert get(dash.url + "healthz")[0] == 200
    finally:
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()
        assert dash.stop() == 0, dash.log.read_text()
