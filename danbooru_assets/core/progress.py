"""Progress of a long loop as log lines: images/s and ETA."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ThroughputLogger:
    """A ``progress(done, total)`` callback that logs images/s and ETA every ``interval_s``.

    Pass ``log=context.log.info`` inside a Dagster asset; the final call always logs.
    """

    def __init__(
        self,
        log: Callable[[str], Any] | None = None,
        interval_s: float = 30.0,
        label: str = "images",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log = log or logger.info
        self.interval_s = interval_s
        self.label = label
        self.clock = clock
        self.start = clock()
        self.last_log = self.start

    def message(self, done: int, total: int) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else math.inf
        eta_text = f"{eta:,.0f} s" if math.isfinite(eta) else "unknown"
        return (
            f"{done:,}/{total:,} {self.label} ({done / max(total, 1):.0%}), "
            f"{rate:,.1f} {self.label}/s, ETA {eta_text}"
        )

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done >= total or now - self.last_log >= self.interval_s:
            self.last_log = now
            self.log(self.message(done, total))
