"""When the monitor resends a window and when it stops asking a cluster that does not answer.

Pure (time passed in, no Ray): the :class:`ServeBackend` classifies each
failed request into a :class:`Failure` kind and asks :class:`RequestPolicy`
what to do.

* ``REPLICA`` (the replica's actor died or became unreachable mid-request):
  the window is resent once. Requests are stateless, so another replica
  serves it and the loss costs a retry, not a stream.
* ``MODEL`` (the replica ran the model and it raised): never resent, the
  same window would fail the same way; the window is reported lost.
* ``TIMEOUT`` / ``UNAVAILABLE`` (no answer in time, no replica, the cluster
  connection broken): not resent (a resend would double the wait); the
  breaker counts it, and after ``threshold`` such failures in a row it
  *opens*: for ``cooldown_s`` every batch fails at once with the last
  reason, instead of each window waiting out its own timeout. The first
  batch after the cooldown is a probe: success closes the breaker, another
  failure opens it again. So a cluster that went away costs one timeout,
  then fast, counted failures, and the monitor resumes by itself when it
  comes back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Failure", "RequestPolicy"]


class Failure(enum.Enum):
    """Why one request failed."""

    REPLICA = "replica"  # the replica died / was killed / its node went away: resend once
    MODEL = "model"  # the replica raised while running the window: never resend
    TIMEOUT = "timeout"  # no answer within the request timeout
    UNAVAILABLE = "unavailable"  # no replica, no cluster connection


@dataclass
class RequestPolicy:
    """Retry rule plus a circuit breaker over cluster-level failures."""

    #: Resends of one window after a REPLICA failure.
    max_retries: int = 1
    #: Cluster-level failures (TIMEOUT / UNAVAILABLE) in a row that open the breaker.
    threshold: int = 1
    #: Seconds the breaker stays open before one probe batch is let through.
    cooldown_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if not self.cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        self._in_a_row = 0
        self._open_until: float | None = None
        self.reason = ""

    def should_retry(self, kind: Failure, attempt: int) -> bool:
        """Resend a request that failed with ``kind`` on its ``attempt``-th try (0 = the first send)?"""
        return kind is Failure.REPLICA and attempt < self.max_retries

    def allow(self, now: float) -> bool:
        """May a batch be sent now? False while the breaker is open (``reason`` says why)."""
        return self._open_until is None or now >= self._open_until

    def retry_in(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0 when closed)."""
        return 0.0 if self._open_until is None else max(0.0, self._open_until - now)

    @property
    def open(self) -> bool:
        """True once tripped and until a batch succeeds again."""
        return self._open_until is not None

    def succeeded(self) -> None:
        """A request got its result: the cluster answers, close the breaker."""
        self._in_a_row = 0
        self._open_until = None

    def failed(self, kind: Failure, now: float, reason: str) -> None:
        """A request failed for good with ``kind``; cluster-level kinds count toward opening."""
        if kind in (Failure.REPLICA, Failure.MODEL):
            return  # the cluster answered; a lost replica or a bad window says nothing about the rest
        self._in_a_row += 1
        self.reason = reason
        if self._in_a_row >= self.threshold:
            self._open_until = now + self.cooldown_s
