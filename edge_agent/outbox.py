"""Sends the ledger's outbox in order, deleting each message once the broker acknowledged it.

A bounded window of messages is in flight at a time; acknowledgements are
read from the transport's publications on this thread. After a restart every unacknowledged message is
sent again; the server's handlers are idempotent, so a duplicate changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.ledger import Ledger
from schemas.transport import Publication, Transport, TransportError

log = logging.getLogger("sidetune.edge.outbox")


class OutboxSender:
    def __init__(self, ledger: Ledger, transport: Transport, window: int = 16,
                 on_sent: Callable[[int | None, int], None] | None = None) -> None:
        self.ledger = ledger
        self.transport = transport
        self.window = window
        self.on_sent = on_sent  # (round, bytes) once acknowledged
        self._wake = threading.Event()
        self._inflight: list[tuple[Publication, int, int | None, int]] = []
        self._last_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def kick(self) -> None:
        self._wake.set()

    def pending(self) -> int:
        return self.ledger.outbox_size()

    def _reap(self) -> None:
        still = []
        for pub, row_id, rnd, nbytes in self._inflight:
            if pub.acknowledged():
                self.ledger.outbox_done(row_id)
                if self.on_sent is not None:
                    self.on_sent(rnd, nbytes)
            else:
                still.append((pub, row_id, rnd, nbytes))
        self._inflight = still

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                room = self.window - len(self._inflight)
                rows = self.ledger.outbox_after(self._last_id, room) if room > 0 and self.transport.connected.is_set() else []
                for row_id, topic, payload, retain, rnd in rows:
                    try:
                        pub = self.transport.publish(topic, payload, retain=retain)
                    except TransportError as e:
                        log.warning("publishing outbox row %d failed (%s); will retry", row_id, e)
                        break
                    self._inflight.append((pub, row_id, rnd, len(payload)))
                    self._last_id = row_id
                if not rows:
                    self._wake.wait(0.05 if self._inflight else 0.25)
                    self._wake.clear()
            except Exception:
                log.exception("outbox sender error; retrying")
                self._stop.wait(1.0)
