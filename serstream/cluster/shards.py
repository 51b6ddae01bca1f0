"""``serstream cluster --shards N``: the per-stream pipelines as Ray actors spread over the cluster's nodes.

The public process keeps the sockets (RTP, ``/ingest``, the call platforms,
files), the one ``/events``, ``/metrics`` and dashboard. Its monitor is a
:class:`~serstream.workers.pool.WorkerPool` (the ``--workers`` facade:
placement by open streams, ``worker_lost`` and restarts, summed stats) whose
slots are :class:`RayLink` s instead of local processes. Each link owns one
:class:`ShardActor`, created with the ``SPREAD`` scheduling strategy (a
multi-node cluster gets them on different nodes), which runs the
``--workers`` loop (:func:`serstream.workers.child.serve_worker`): a plain
:class:`~serstream.monitor.Monitor` whose backend is a
:class:`~serstream.cluster.backend.ServeBackend` on the same Serve
deployment, i.e. the single-process pipeline code, with its batches going
straight from the shard's node to the replicas.

Traffic: one actor call per shard every :data:`STEP_PERIOD_S` (``step``):
the down messages queued since the last call (``open``/``audio``/``close``
items, at most :data:`MAX_STEP_BYTES` of audio per call) go in, the up
messages the shard made since (``events``, ``stats``, ``ready``, ``bye``)
come back in the reply. Calls are made one at a time by one thread per
shard, so the order of both directions is kept. Audio arrival times are
moved onto the shard's monotonic clock (offset measured at start, half the
round trip) so ``latency_ms`` still counts from the public process's socket.

Failures: an actor that dies (``ray.kill``, its node lost, out of memory)
fails the next call with ``RayActorError``: the pool's death path reports
its streams (``worker_lost``, closed), makes a new actor and reopens the
streams there. A call not answered in ``step_timeout_s`` kills the actor
(same path). Any other failure of a call (Ray Client disconnected, the head
gone), or a new actor not up in the pool's start timeout, marks the link
``gone``: the pool gives up (one line) and the command exits non-zero.

Ray is imported lazily: the pure parts here (:func:`take_batch`,
:func:`shift_arrivals`) load and are tested without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from serstream.contract import ModelInfo
from serstream.errors import ClusterError, one_line
from serstream.workers.link import Ready

__all__ = ["ShardActor", "RayLink", "shard_pool", "take_batch", "shift_arrivals", "clock_offset", "STEP_PERIOD_S",
           "MAX_STEP_BYTES"]

log = logging.getLogger("serstream.cluster")

#: How often each shard is called (seconds): audio down and events up ride the same call.
STEP_PERIOD_S = 0.02
#: Audio bytes per call at most (the rest waits for the next call): one call stays well under Ray's
#: inline-argument sizes and a slow shard cannot make one giant message.
MAX_STEP_BYTES = 4 << 20
#: Round trips used to measure a shard's clock offset (the quickest one is kept).
CLOCK_SAMPLES = 5
#: A restarted shard not up by then means the cluster is going away (below Ray's own 60 s, after which
#: Ray ends a driver that lost its head).
RESTART_TIMEOUT_S = 30.0
#: The deployment's name inside the Serve application (serstream/cluster/deployment.py).
DEPLOYMENT_NAME = "SerstreamInference"


# ------------------------------------------------------------------ pure parts


def take_batch(pending: deque[tuple[Any, ...]], max_bytes: int = MAX_STEP_BYTES) -> list[tuple[Any, ...]]:
    """The messages for one call, in order: everything queued, up to ``max_bytes`` of audio.

    An ``items`` message (the pool's list of ``open``/``audio``/``close``
    items) whose audio would pass the limit is split: what fits goes now, the
    rest stays first in ``pending`` for the next call, so no item is lost or
    reordered and a single item bigger than the limit still goes (alone).
    """
    out: list[tuple[Any, ...]] = []
    used = 0
    while pending:
        message = pending[0]
        if message[0] != "items":
            out.append(pending.popleft())
            continue
        items = message[1]
        taken: list[tuple[Any, ...]] = []
        for n, item in enumerate(items):
            size = int(item[3].nbytes) if item[0] == "audio" else 0
            if used + size > max_bytes and (taken or out):
                if taken:
                    out.append(("items", taken))
                pending[0] = ("items", items[n:])
                return out
            taken.append(item)
            used += size
        pending.popleft()
        out.append(("items", taken))
    return out


def clock_offset(samples: Sequence[tuple[float, float, float]]) -> float:
    """The shard's clock minus ours, from ``(sent, remote, back)`` readings: the quickest round trip's midpoint.

    The remote reading was taken somewhere between ``sent`` and ``back``; the
    quickest round trip bounds the error best (half of it).
    """
    if not samples:
        raise ValueError("no clock readings")
    sent, remote, back = min(samples, key=lambda s: s[2] - s[0])
    return remote - (sent + back) / 2.0


def shift_arrivals(messages: Sequence[tuple[Any, ...]], offset: float) -> list[tuple[Any, ...]]:
    """``messages`` with every audio item's arrival time moved by ``offset`` (onto the shard's clock)."""
    if not offset:
        return list(messages)
    shifted: list[tuple[Any, ...]] = []
    for message in messages:
        if message[0] == "items":
            message = ("items", [(item[0], item[1], float(item[2]) + offset, item[3]) if item[0] == "audio" else item
                                 for item in message[1]])
        shifted.append(message)
    return shifted


# ------------------------------------------------------------------ the actor (runs on a Ray node)


class _Inbox:
    """The shard's ``down``: what ``step`` delivered, read in order by the worker loop."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def recv(self) -> tuple[Any, ...]:
        return self.queue.get()


class _Collector:
    """The shard's ``up`` connection: messages gathered until the next ``step`` takes them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.items.append(message)

    def drain(self) -> list[tuple[Any, ...]]:
        with self.lock:
            items, self.items = self.items, []
        return items


class ShardActor:
    """One pipeline shard: the ``--workers`` loop on a Serve backend; wrapped with ``ray.remote`` when used."""

    def __init__(self, index: int, app: str, info: ModelInfo, device: str, config: Any, timeout_s: float) -> None:
        import ray
        from ray import serve

        from serstream.cluster.backend import ServeBackend
        from serstream.cluster.policy import RequestPolicy
        from serstream.workers.child import _Up, serve_worker

        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)
        self.backend = ServeBackend(handle, info, device, f"shard {index}", timeout_s=timeout_s,
                                    policy=RequestPolicy(max_retries=1, threshold=1, cooldown_s=5.0))
        self.node = str(ray.get_runtime_context().get_node_id())
        self._inbox = _Inbox()
        self._up = _Collector()
        self._thread = threading.Thread(
            target=serve_worker, args=(self._inbox, _Up(self._up), self.backend, config, [self.backend.counters]),
            name=f"serstream-shard-{index}", daemon=True)
        self._thread.start()

    def where(self) -> dict[str, Any]:
        """Its node, process and monotonic clock (the link's clock offset)."""
        return {"node": self.node, "pid": os.getpid(), "clock": time.monotonic()}

    def step(self, messages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Deliver the pool's messages in order; return everything the shard sent up since the last call."""
        for message in messages:
            self._inbox.queue.put(message)
        return self._up.drain()


# ------------------------------------------------------------------ the public process's side

#: ``ray.remote(ShardActor)``, made once (on first use: Ray is imported only then).
_REMOTE: Any = None


def _is_actor_death(exc: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError))


class RayLink:
    """A :class:`~serstream.workers.link.Link` to one :class:`ShardActor` (one incarnation)."""

    def __init__(
        self,
        index: int,
        info: ModelInfo,
        device: str,
        config: Any,
        *,
        app: str,
        num_cpus: float = 1.0,
        request_timeout_s: float = 10.0,
        step_timeout_s: float = 10.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        import ray

        if not ray.is_initialized():
            # Never let Ray start a local instance of its own (any Ray call would, once disconnected).
            raise ClusterError("not connected to the Ray cluster any more")
        global _REMOTE
        if _REMOTE is None:
            _REMOTE = ray.remote(ShardActor)
        self.actor = _REMOTE.options(
            scheduling_strategy="SPREAD", num_cpus=num_cpus, max_restarts=0, max_concurrency=1,
            name=None,
        ).remote(index, app, info, device, config, request_timeout_s)
        self.index = index
        self.gone: str | None = None
        self.node: str | None = None
        self.actor_pid: int | None = None
        self.offset = 0.0
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._cond = threading.Condition()
        self._out: deque[tuple[Any, ...]] = deque()
        self._in: deque[tuple[Any, ...]] = deque()
        self._ended = False
        self._down_closed = False
        self._why = "running"
        self._thread = threading.Thread(target=self._pump, name=f"serstream-shard-{index}-link", daemon=True)
        self._thread.start()

    # -- Link

    @property
    def pid(self) -> int | None:
        return None  # not a process of this machine

    @property
    def label(self) -> str:
        actor = self.actor._actor_id.hex()[:8] if hasattr(self.actor, "_actor_id") else "?"
        where = f" on node {self.node[:8]}" if self.node else ""
        return f"actor {actor}{where}"

    def send(self, message: tuple[Any, ...]) -> None:
        with self._cond:
            if self._ended or self._down_closed:
                raise OSError(f"shard {self.index} link closed")
            self._out.append(message)

    def wait(self, timeout: float) -> Ready:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._in) or self._ended, timeout=timeout)
            if self._in:
                return "message"
            return "ended" if self._ended else None

    def poll(self) -> bool:
        with self._cond:
            return bool(self._in)

    def recv(self) -> tuple[Any, ...]:
        with self._cond:
            if self._in:
                return self._in.popleft()
        raise EOFError(f"shard {self.index} ended")

    def close_down(self) -> None:
        with self._cond:
            self._down_closed = True

    def close_up(self) -> None:
        pass

    def is_alive(self) -> bool:
        with self._cond:
            return not self._ended

    def kill(self) -> None:
        import ray

        if not ray.is_initialized():  # disconnected: a Ray call would start a local instance
            return
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def join(self, timeout: float) -> None:
        """This incarnation is over (it said bye, or died): make sure the actor is gone, end the pump."""
        self.kill()
        self._end("stopped" if self._why == "running" else self._why)
        self._thread.join(timeout)

    def how(self) -> str:
        return self._why

    def stalled(self, seconds: float) -> None:
        self.gone = (f"shard {self.index} was not running again within {seconds:g} s "
                     "(is the Ray cluster still there, with room for it?)")
        self.kill()
        self._end(f"not started within {seconds:g} s")

    # -- the pump: one call at a time

    def _end(self, why: str) -> None:
        with self._cond:
            if not self._ended:
                self._ended = True
                self._why = why
            self._cond.notify_all()

    def _pump(self) -> None:
        import ray
        from ray import exceptions as rex

        try:
            # The first call waits for the actor to be made (seconds): too coarse for the clock.
            where = ray.get(self.actor.where.remote(), timeout=self.start_timeout_s)
            self.node = str(where["node"])
            self.actor_pid = int(where["pid"])
            # Arrival times are this process's monotonic clock; the shard's differs (another machine).
            samples = []
            for _ in range(CLOCK_SAMPLES):
                sent = time.monotonic()
                remote = float(ray.get(self.actor.where.remote(), timeout=self.step_timeout_s)["clock"])
                samples.append((sent, remote, time.monotonic()))
            self.offset = clock_offset(samples)
        except Exception as exc:  # noqa: BLE001 - every failure ends the link with its reason
            self._failed(exc, rex, starting=True)
            return
        while True:
            time.sleep(STEP_PERIOD_S)
            with self._cond:
                if self._ended:
                    return
                batch = take_batch(self._out)
            if not ray.is_initialized():
                self.gone = "lost the Ray cluster (disconnected)"
                self._end("cluster lost (disconnected)")
                return
            try:
                replies = ray.get(self.actor.step.remote(shift_arrivals(batch, self.offset)),
                                  timeout=self.step_timeout_s)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc, rex, starting=False)
                return
            if replies:
                with self._cond:
                    self._in.extend(replies)
                    self._cond.notify_all()
            if any(reply[0] == "bye" for reply in replies):
                # The shard stopped (its streams' finals are above): this incarnation is done.
                self.kill()
                self._end("stopped")
                return

    def _failed(self, exc: BaseException, rex: Any, *, starting: bool) -> None:
        name = type(exc).__name__
        if isinstance(exc, rex.GetTimeoutError):
            limit = self.start_timeout_s if starting else self.step_timeout_s
            if starting:
                self.gone = (f"shard {self.index} did not start within {limit:g} s "
                             "(is the Ray cluster still there, with room for it?)")
            self.kill()
            self._end(f"no answer within {limit:g} s")
        elif _is_actor_death(exc):
            self._end(f"actor died ({name})")
        else:
            # Not this actor: the connection to the cluster (Ray Client gone, the head down, a bad install).
            self.gone = f"lost the Ray cluster ({name}: {one_line(exc, first_line=True)})"
            self._end(f"cluster lost ({name})")


def shard_pool(
    backend: Any,
    config: Any,
    sink: Callable[[dict[str, Any]], None],
    *,
    shards: int,
    app: str,
    num_cpus: float = 1.0,
    request_timeout_s: float = 10.0,
    step_timeout_s: float = 10.0,
    start_timeout_s: float = 120.0,
    restart_timeout_s: float = RESTART_TIMEOUT_S,
    max_reopens: int = 3,
) -> Any:
    """The public process's monitor for ``--shards N``: a WorkerPool whose N slots are Ray shard actors.

    ``backend``: the :class:`~serstream.cluster.backend.ServeBackend` of the
    deployment (its ``info`` and ``device`` drive the pool; the shards make
    their own handles to the same application ``app``).
    """
    from serstream.workers.pool import WorkerPool

    made: set[int] = set()

    def make(index: int, info: ModelInfo, device: str, cfg: Any) -> RayLink:
        # A first start may wait for the cluster (autoscaling, images); a restart on a healthy cluster
        # takes seconds, and one that does not come up means the cluster is going away.
        timeout = restart_timeout_s if index in made else start_timeout_s
        made.add(index)
        return RayLink(index, info, device, cfg, app=app, num_cpus=num_cpus, request_timeout_s=request_timeout_s,
                       step_timeout_s=step_timeout_s, start_timeout_s=timeout)

    return WorkerPool(backend, config, sink, workers=shards, link_factory=make, name="shard",
                      start_timeout_s=start_timeout_s, restart_timeout_s=restart_timeout_s, max_reopens=max_reopens)


def placement(pool: Any) -> list[str | None]:
    """Each shard's node id now (None: not placed yet, or restarting)."""
    out: list[str | None] = []
    for slot in pool._slots:
        link = slot.link
        out.append(getattr(link, "node", None) if link is not None else None)
    return out
