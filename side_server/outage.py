"""One outage of a service a loop retries (Redis, for the worker's loops): backed-off retries, one
log line when it starts and one when it ends with its length, instead of a line every second.

    outage = Outage("redis", "the training loop", log)
    while ...:
        try:
            work()
            outage.over()
        except redis.ConnectionError as e:
            stopping.wait(outage.failed(e))   # 0.5 s, 1 s, 2 s, 4 s, then every 5 s
"""

from __future__ import annotations

import logging
import time

#: The first wait and the longest: a Redis back after a restart is seen within 5 s.
FIRST_WAIT = 0.5
MAX_WAIT = 5.0


class Outage:
    def __init__(self, service: str, where: str, log: logging.Logger,
                 first: float = FIRST_WAIT, longest: float = MAX_WAIT) -> None:
        self.service, self.where, self.log = service, where, log
        self.first, self.longest = first, longest
        self.since: float | None = None
        self.tries = 0

    def failed(self, error: BaseException) -> float:
        """Note a failed try; return how long to wait before the next."""
        self.tries += 1
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s unavailable in %s (%s); retrying, at most every %.0f s, until it is back",
                             self.service, self.where, error, self.longest)
        else:
            self.log.debug("%s still unavailable in %s (%s)", self.service, self.where, error)
        return min(self.longest, self.first * 2 ** (self.tries - 1))

    def over(self) -> None:
        """A try succeeded: if an outage was on, say how long it lasted."""
        if self.since is not None:
            self.log.warning("%s back in %s after %.1f s (%d failed tries)", self.service, self.where,
                             time.monotonic() - self.since, self.tries)
            self.since, self.tries = None, 0
