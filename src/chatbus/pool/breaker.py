"""A circuit breaker per server: stop sending requests to a server that keeps failing.

Closed: requests flow; `failure_threshold` failures in a row (real calls, or health checks)
open it. Open: no request is sent for `cooldown` seconds; then the next health check
decides: it fails, the cooldown starts again; it succeeds, the circuit is half-open.
Half-open: one request goes through as the probe; its success closes the circuit, its
failure opens it again. A health check alone never closes it: a server can answer
`/api/version` and fail every chat.

Times are the caller's clock (the event loop's), passed in, so that the tests are tables.
"""

from dataclasses import dataclass
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int
    cooldown: float
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    """Failures in a row."""
    last_failure_at: float = 0.0
    probing: bool = False
    """Half-open, and the probe request is out."""

    def admits(self) -> bool:
        """Whether a request may be sent now."""
        if self.state is CircuitState.CLOSED:
            return True
        return self.state is CircuitState.HALF_OPEN and not self.probing

    @property
    def awaits_probe(self) -> bool:
        """Half-open, and the next request sent is the probe."""
        return self.state is CircuitState.HALF_OPEN and not self.probing

    def leased(self) -> None:
        """A request is sent."""
        if self.state is CircuitState.HALF_OPEN:
            self.probing = True

    def succeeded(self) -> None:
        """The server answered a request (whatever the answer: it is up)."""
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.probing = False

    def failed(self, now: float) -> None:
        """The server failed a request or a health check."""
        self.failures += 1
        self.last_failure_at = now
        self.probing = False
        if self.state is not CircuitState.CLOSED or self.failures >= self.failure_threshold:
            self.state = CircuitState.OPEN

    def abandoned(self) -> None:
        """A request ended without telling anything about the server (cancelled)."""
        self.probing = False

    def cooled_down(self, now: float) -> bool:
        return self.state is CircuitState.OPEN and now >= self.last_failure_at + self.cooldown

    def checked(self, ok: bool, now: float) -> None:
        """The outcome of a health check."""
        if not ok:
            self.failed(now)
        elif self.cooled_down(now):
            self.state = CircuitState.HALF_OPEN
        elif self.state is CircuitState.CLOSED and now >= self.last_failure_at + self.cooldown:
            # Failures long past, and the server answers: no longer held against it.
            self.failures = 0

    def next_check_at(self, last_check_at: float, interval: float) -> float:
        """When the server should be checked next: at the end of the cooldown while open."""
        if self.state is CircuitState.OPEN:
            return self.last_failure_at + self.cooldown
        return last_check_at + interval
