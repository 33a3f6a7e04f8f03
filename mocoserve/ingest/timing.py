"""`StageTime`: what one stage of the ingest pipeline did and how long it took."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class StageTime:
    """What one stage did: seconds spent in it, items through it, calls made."""

    seconds: float = 0.0
    items: int = 0
    calls: int = 0

    def add(self, started: float, items: int) -> None:
        """Count a call that began at `started` (perf_counter) and handled `items`."""
        self.seconds += time.perf_counter() - started
        self.items += items
        self.calls += 1
