"""How the pool talks to one worker: the transport of a slot, a local process or (cluster shards) a Ray actor.

:class:`~serstream.workers.pool.WorkerPool` keeps everything else (the
registry, placement, restarts, stats, the events' way to the sink) and only
asks a :class:`Link` to carry the worker protocol of
:mod:`serstream.workers.child` (lists of ``open``/``audio``/``close`` items
down, ``events``/``stats``/``ready``/``bye`` messages up) and to say when the
worker ended and why. :class:`ProcessLink` is ``--workers N`` (two pipes and a
spawned process); ``serstream.cluster.shards.RayLink`` is ``cluster --shards N``.
A link is one incarnation: a restart makes a new one.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
from typing import Any, Literal, Protocol

from serstream.contract import ModelInfo

__all__ = ["Link", "LinkFactory", "ProcessLink", "describe_exit"]

#: What :meth:`Link.wait` saw: a message to read, the worker's end (everything it sent read), or nothing yet.
Ready = Literal["message", "ended"] | None


class Link(Protocol):
    """One worker incarnation as the pool sees it."""

    #: Set when the failure means the whole backend is gone (a Ray cluster lost), not one worker:
    #: the pool then gives up instead of restarting (one line; the command exits non-zero).
    gone: str | None

    @property
    def pid(self) -> int | None: ...

    @property
    def label(self) -> str:
        """How log lines and ``worker_lost`` events name it: ``pid 1234``, ``actor ab12 on node cd34``."""
        ...

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue or send one down message; OSError (or EOFError/ValueError) when the link is broken."""
        ...

    def wait(self, timeout: float) -> Ready: ...

    def poll(self) -> bool: ...

    def recv(self) -> tuple[Any, ...]:
        """The next up message; EOFError (or OSError) when the worker ended and nothing is left."""
        ...

    def close_down(self) -> None: ...

    def close_up(self) -> None: ...

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...

    def join(self, timeout: float) -> None: ...

    def how(self) -> str:
        """Why it ended, for the one log line: ``killed by signal 9``, ``actor died (ActorDiedError)``."""
        ...

    def stalled(self, seconds: float) -> None:
        """A restarted worker that did not say ready within ``seconds``: end it (and say if the backend is gone)."""
        ...


class LinkFactory(Protocol):
    def __call__(self, index: int, info: ModelInfo, device: str, config: Any, /) -> Link: ...


def describe_exit(code: int | None) -> str:
    """A process exit code in words (negative: the signal that ended it)."""
    if code is None:
        return "stopped answering"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class ProcessLink:
    """``--workers``: a spawned process running :func:`serstream.workers.child.worker_main`, two pipes."""

    def __init__(self, ctx: Any, index: int, info: ModelInfo, device: str, config: Any) -> None:
        from serstream.workers.child import worker_main

        down_recv, down_send = ctx.Pipe(duplex=False)
        up_recv, up_send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=worker_main, name=f"serstream-worker-{index}", daemon=True,
            args=(index, down_recv, up_send, info, device, config),
        )
        proc.start()
        # The child's ends live in the child only: its death then ends our reads (EOF).
        down_recv.close()
        up_send.close()
        self.proc = proc
        self._down: Any = down_send
        self._up = up_recv
        self.gone: str | None = None

    @property
    def pid(self) -> int | None:
        return int(self.proc.pid) if self.proc.pid is not None else None

    @property
    def label(self) -> str:
        return f"pid {self.proc.pid}"

    def send(self, message: tuple[Any, ...]) -> None:
        down = self._down
        if down is None:
            raise OSError("the worker's pipe is closed")
        down.send(message)

    def wait(self, timeout: float) -> Ready:
        ready = multiprocessing.connection.wait([self._up, self.proc.sentinel], timeout=timeout)
        if not ready:
            return None
        # A readable pipe first: what the process sent before it ended is still in it.
        return "message" if self._up in ready else "ended"

    def poll(self) -> bool:
        try:
            return bool(self._up.poll(0))
        except (EOFError, OSError):
            return False

    def recv(self) -> tuple[Any, ...]:
        message: tuple[Any, ...] = self._up.recv()
        return message

    def close_down(self) -> None:
        down, self._down = self._down, None
        if down is not None:
            with contextlib.suppress(OSError):
                down.close()

    def close_up(self) -> None:
        with contextlib.suppress(OSError):
            self._up.close()

    def is_alive(self) -> bool:
        return bool(self.proc.is_alive())

    def kill(self) -> None:
        self.proc.kill()

    def join(self, timeout: float) -> None:
        self.proc.join(timeout)

    def how(self) -> str:
        return describe_exit(self.proc.exitcode)

    def stalled(self, seconds: float) -> None:
        self.proc.kill()
