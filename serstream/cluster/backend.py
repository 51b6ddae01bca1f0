"""The monitor's side of cluster inference: an :class:`InferenceBackend` that sends windows to Ray Serve.

:class:`ServeBackend` has the three members the inference worker uses
(``info``, ``device``, ``infer``), so the monitor runs unchanged on it: the
batch the worker hands over is split into one request per window (audio plus
the stream's state rows, :mod:`serstream.cluster.wire`), all sent at once
through a Serve ``DeploymentHandle``, so the replicas' ``@serve.batch``
groups them with the windows of every other monitor, and the results are
stacked back in order.

Failures (:mod:`serstream.cluster.policy` holds the rules):

* a window whose replica died mid-request is sent again once (another
  replica serves it: requests are stateless); counted in ``replica_lost``
  and ``retries``;
* a window the model fails on, a timeout (``timeout_s`` for the whole
  batch, so nothing waits forever), a cluster with no replica: ``infer``
  raises :class:`~serstream.errors.InferenceError` with one line, which the
  worker handles like any model failure (the batch is retried window by
  window, the lost windows are counted, one ``error`` event per distinct
  message, the other streams go on);
* after a timeout or a broken connection the breaker opens: for
  ``cooldown_s`` batches fail at once with the same line instead of each
  waiting out the timeout; the first batch after it probes the cluster again.

Ray is imported lazily (only for the exception types), so this module loads
without it; the handle is whatever :func:`serstream.cluster.connect.deploy`
returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from serstream.cluster.policy import Failure, RequestPolicy
from serstream.cluster.wire import WindowRequest, WindowResult, join_results, split_batch
from serstream.contract import ModelInfo
from serstream.errors import InferenceError, one_line
from serstream.inference.session import InferenceOutput

__all__ = ["ServeBackend", "classify"]

log = logging.getLogger(__name__)


def classify(exc: BaseException) -> tuple[Failure, str]:
    """A failed request's kind and its one-line description."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(exc, rex.RayTaskError):
        # The replica's own code raised: report the cause, not Ray's multi-line traceback.
        cause = getattr(exc, "cause", None) or exc
        return Failure.MODEL, f"replica raised {type(cause).__name__}: {one_line(cause, first_line=True)}"
    if isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                        sex.ReplicaUnavailableError)):
        return Failure.REPLICA, f"inference replica lost ({type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT, "no answer from the inference cluster in time"
    return Failure.UNAVAILABLE, f"inference cluster unavailable: {type(exc).__name__}: {one_line(exc, first_line=True)}"


class ServeBackend:
    """Runs the monitor's batches on a Ray Serve deployment (see module docstring).

    ``handle``: the deployment's ``DeploymentHandle``; ``info`` and
    ``device``: what the replicas reported (``describe``); ``path``: a
    description for the start-up line (the model file and where it runs).
    """

    def __init__(
        self,
        handle: Any,
        info: ModelInfo,
        device: str,
        path: str,
        *,
        timeout_s: float = 10.0,
        policy: RequestPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.handle = handle
        self.info = info
        self.device = device
        self.path = path
        self.timeout_s = float(timeout_s)
        self._policy = policy or RequestPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._nodes: Counter[str] = Counter()
        self._replicas: Counter[str] = Counter()
        #: Requests sent (one per window, resends included).
        self.requests_sent = 0

    # ------------------------------------------------------------------ InferenceBackend

    def infer(
        self,
        audio: np.ndarray,
        lengths: np.ndarray,
        state: Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None = None,
    ) -> InferenceOutput:
        """Run one padded batch on the cluster; InferenceError (one line) when any window fails for good."""
        requests = split_batch(audio, lengths, state, self.info.state_inputs)
        started = self._clock()
        with self._lock:
            if not self._policy.allow(started):
                self._counts["refused_batches"] += 1
                # The same text for every refused batch: the worker reports a message once, then counts it.
                raise InferenceError(f"{self._policy.reason} (not asking the cluster for "
                                     f"{self._policy.cooldown_s:g} s after each failure)")
        deadline = started + self.timeout_s
        responses: list[Any] = []
        try:
            for request in requests:
                responses.append(self._send(request))
        except Exception as exc:  # noqa: BLE001 - e.g. a Ray Client connection that has closed
            for response in responses:
                _cancel(response)
            kind, message = classify(exc)
            with self._lock:
                self._counts[_COUNTER[kind]] += 1
                self._policy.failed(kind, self._clock(), message)
            raise InferenceError(message) from None
        results: list[WindowResult] = []
        try:
            for i, request in enumerate(requests):
                results.append(self._collect(request, responses[i], deadline))
        except InferenceError:
            for response in responses[len(results) + 1:]:
                _cancel(response)
            raise
        return join_results(results, self.info.state_inputs)

    # ------------------------------------------------------------------ counters

    def counters(self) -> dict[str, int]:
        """Counters for the monitor's ``stats`` (``drops``) and /metrics, prefixed ``cluster_``.

        ``replica_lost``: requests whose replica died mid-request (each resent,
        ``retries``); ``timeouts``; ``unavailable``: requests refused by a cluster
        without replicas or connection; ``model_errors``: windows the model failed
        on; ``refused_batches``: batches failed at once while the breaker was open.
        """
        with self._lock:
            return {f"cluster_{key}": int(value) for key, value in sorted(self._counts.items())}

    @property
    def answering(self) -> bool:
        """False while the breaker is open (the cluster timed out or went away)."""
        with self._lock:
            return not self._policy.open

    def served_by(self) -> tuple[dict[str, int], dict[str, int]]:
        """Windows answered per node id and per replica id."""
        with self._lock:
            return dict(self._nodes), dict(self._replicas)

    # ------------------------------------------------------------------ internals

    def _send(self, request: WindowRequest) -> Any:
        with self._lock:
            self.requests_sent += 1
        return self.handle.infer_window.remote(request)

    def _collect(self, request: WindowRequest, response: Any, deadline: float) -> WindowResult:
        attempt = 0
        while True:
            try:
                result: WindowResult = response.result(timeout_s=max(0.001, deadline - self._clock()))
            except Exception as exc:  # noqa: BLE001 - every failure is classified and reported in one line
                kind, message = classify(exc)
                if kind is Failure.TIMEOUT:
                    _cancel(response)
                with self._lock:
                    self._counts[_COUNTER[kind]] += 1
                    retry = self._policy.should_retry(kind, attempt)
                    if retry:
                        self._counts["retries"] += 1
                    else:
                        self._policy.failed(kind, self._clock(), message)
                if retry:
                    attempt += 1
                    log.info("%s; sending the window again", message)
                    response = self._send(request)
                    continue
                raise InferenceError(message) from None
            if result.error is not None:
                with self._lock:
                    self._counts["model_errors"] += 1
                    self._policy.succeeded()  # the cluster answered
                raise InferenceError(f"replica failed on a window: {result.error}")
            with self._lock:
                self._policy.succeeded()
                self._nodes[result.node] += 1
                self._replicas[result.replica] += 1
            return result


_COUNTER = {
    Failure.REPLICA: "replica_lost",
    Failure.MODEL: "model_errors",
    Failure.TIMEOUT: "timeouts",
    Failure.UNAVAILABLE: "unavailable",
}


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - best effort: the request may be done or its replica gone
        pass
