"""Pure rules of the ``--workers`` pool: how many workers, which worker takes a stream, when to reopen.

No processes, threads or clocks here: the pool (``pool.py``) asks these
functions and does what they say, so the rules are tested on their own.
"""

from __future__ import annotations

from typing import Literal, Sequence

__all__ = ["parse_workers", "assign_worker", "may_reopen", "restart_delay", "after_loss", "MAX_WORKERS",
           "CLOSE_ON_LOSS_SOURCES"]

#: More worker processes than this is a typo, not a machine.
MAX_WORKERS = 256


def parse_workers(text: str | int, cpu_count: int | None) -> int:
    """``--workers`` as a count: a positive integer, or ``auto`` (one per core).

    ValueError with one line on anything else (``0``, ``-1``, ``many``).
    """
    if isinstance(text, int):
        value = text
    else:
        word = str(text).strip().lower()
        if word == "auto":
            return max(1, min(MAX_WORKERS, int(cpu_count or 1)))
        try:
            value = int(word)
        except ValueError:
            raise ValueError(f"--workers expects a positive integer or 'auto', got {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"--workers must be 1 to {MAX_WORKERS} (or 'auto'), got {value}")
    return value


def assign_worker(open_streams: Sequence[int], alive: Sequence[bool]) -> int | None:
    """The worker a new stream is pinned to for its life: least loaded by open streams, ties by index.

    Only running workers are candidates (a worker being restarted takes no
    new streams); None when none is running. The count is of streams, not of
    their audio rate: a stream's cost is mostly per stream (VAD frames,
    windows), and a sticky rule keeps each stream's state in one process.
    """
    if len(open_streams) != len(alive):
        raise ValueError("open_streams and alive must have one entry per worker")
    best: int | None = None
    for index, (count, up) in enumerate(zip(open_streams, alive)):
        if up and (best is None or count < open_streams[best]):
            best = index
    return best


#: Sources whose streams are closed for good when their worker dies, not reopened: an
#: ``/ingest`` client reads its stream's events until the ``stream`` closed event, so it
#: reconnects (a new stream) rather than pushing into a stream whose events it no longer gets.
CLOSE_ON_LOSS_SOURCES = frozenset({"websocket"})


def may_reopen(reopens_so_far: int, max_reopens: int, source: str = "") -> bool:
    """Whether a stream whose worker died is reopened on the restarted worker.

    A stream that was on a worker each time it died ``max_reopens`` times is
    closed for good instead: its audio may be what kills the worker, and
    reopening it forever would take the slot's other streams down with it.
    Streams of :data:`CLOSE_ON_LOSS_SOURCES` are never reopened.
    """
    return reopens_so_far < max_reopens and source not in CLOSE_ON_LOSS_SOURCES


def restart_delay(uptime_s: float, min_uptime_s: float = 5.0, delay_s: float = 1.0) -> float:
    """Seconds to wait before restarting a worker that died after ``uptime_s`` seconds.

    A worker that dies soon after starting (a crash loop: a broken install, a
    poisoned stream) is restarted after ``delay_s`` instead of at once, so a
    loop costs one spawn a second, not a core.
    """
    return delay_s if uptime_s < min_uptime_s else 0.0


Loss = Literal["start_failed", "fatal", "restart"]


def after_loss(*, first_start: bool, was_ready: bool, backend_gone: bool) -> Loss:
    """What the pool does when a worker (a process, or a cluster shard actor) ended unasked.

    * ``start_failed``: its first incarnation never said ready (a broken
      install, an import error): restarting would only loop; the pool's start
      fails with one line.
    * ``fatal``: the worker's backend itself is gone (a Ray cluster whose head
      went away, a shard the cluster cannot place again): restarting cannot
      help; its streams are closed and the command exits non-zero.
    * ``restart``: anything else (killed, out of memory, a crash): a new
      incarnation at the same index, its streams reopen there.
    """
    if first_start and not was_ready:
        return "start_failed"
    if backend_gone:
        return "fatal"
    return "restart"
