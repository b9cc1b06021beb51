"""Exponential back-off with jitter, for reconnects and retries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    initial_s: float
    max_s: float
    # ±10 %: listeners restarted together do not hammer a recovering server in step.
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        factor: float = self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        return base * factor

    def reset(self) -> None:
        self.attempt = 0
