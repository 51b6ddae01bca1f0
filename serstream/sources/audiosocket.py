"""Asterisk AudioSocket over TCP: each connection's call audio into a monitor stream.

The thin I/O adapter around the pure
:class:`~serstream.sources.audiosocket_session.AudioSocketSession`: a thread
of its own owns the listening socket and every connection (non-blocking,
one ``selectors`` loop, like the RTP source), hands each chunk read with
its arrival time to the connection's session, polls the sessions every
``poll_interval_s`` for their timeouts, and turns the decisions into
monitor calls:

* ``Start``    -> ``monitor.open_stream("audiosocket:<uuid>", source="audiosocket", codec="pcm_s16le",
  sample_rate=<8000..48000>, unique=True)``; on a listener with a role
  (``--audiosocket HOST:PORT=caller``) the id is ``audiosocket:<uuid>:<role>``
  with ``call=<uuid>`` and ``role=<role>``, so the connections that carry one
  UUID on the ``caller`` and ``callee`` listeners are the two parties of one call;
* ``Audio``    -> ``handle.push(samples)`` (one push per connection per read);
* ``Rejected`` / ``Ended`` with a cause -> counted; the first of each cause on
  a listener is logged (one line) and sent as an ``error`` event (on the
  stream when there is one, else on the listener ``audiosocket@HOST:PORT``);
* ``Ended``    -> ``handle.close(reason)`` and the socket is closed.

A thread rather than the asyncio loop for the same reason as RTP: hundreds
of calls are thousands of small messages a second, which must not delay the
WebSocket server, and ``StreamHandle.push`` never blocks.

AudioSocket has no authentication. So a listener on an address other than
loopback must be given the peers it accepts (``allow``: networks, e.g. the
Asterisk servers' addresses); connections from anywhere else are closed at
once and counted (``refused_address``). Connections are also capped per
listener and per peer address (``refused_busy``, ``refused_busy_address``).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import re
import selectors
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from serstream import events
from serstream.access import is_loopback_host
from serstream.monitor import MonitorError, SourceError
from serstream.sources.audiosocket_session import (
    CAUSES,
    Audio,
    AudioSocketSession,
    Ended,
    Output,
    Rejected,
    SessionConfig,
    Start,
)

if TYPE_CHECKING:
    from serstream.monitor import Monitor, StreamHandle

__all__ = [
    "AudioSocketConfig",
    "AudioSocketSource",
    "ListenSpec",
    "parse_listen_spec",
    "parse_allow",
    "add_audiosocket_arguments",
    "audiosocket_sources_from_args",
]

log = logging.getLogger(__name__)

_READ_BYTES = 65_536
_FIRST_READ_BYTES = 1024  # reads before the stream is open (its ring's room is not known yet)
_BACKPRESSURE_S = 0.02  # pause of a connection whose stream's ring is nearly full
_CLOSED_KEPT = 256
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
#: Refusals before a connection gets a session (the keys of ``stats()["refused"]``).
REFUSALS = ("refused_address", "refused_busy", "refused_busy_address")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AudioSocketConfig:
    """Settings of one AudioSocket listener."""

    session: SessionConfig = field(default_factory=SessionConfig)
    max_connections: int = 512  # open connections on this listener; more are closed at once (counted)
    max_per_address: int = 512  # of them from one peer address (one Asterisk carries many calls)
    allow: tuple[Network, ...] = ()  # peers accepted besides loopback; required off loopback
    poll_interval_s: float = 0.05  # how often the timeouts are checked

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not 0.005 <= self.poll_interval_s <= 1.0:
            raise ValueError(f"poll_interval_s must be in 0.005-1 s, got {self.poll_interval_s}")


@dataclass(frozen=True)
class ListenSpec:
    """One ``--audiosocket HOST:PORT[=ROLE]``."""

    host: str
    port: int
    role: str | None = None


def parse_listen_spec(text: str) -> ListenSpec:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT``, optionally ``=ROLE``; ValueError (one line) if malformed."""
    value, _, role = text.strip().partition("=")
    if role and not _ROLE.fullmatch(role):
        raise ValueError(f"bad AudioSocket role {role!r} in {text!r}: 1-32 lower-case letters, digits, _ or -, "
                         "e.g. caller")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad AudioSocket address {text!r}: write an IPv6 address in brackets, e.g. [::1]:9092")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad AudioSocket address {text!r}: expected HOST:PORT with a port 0-65535, "
                         "e.g. 127.0.0.1:9092")
    return ListenSpec(host or "127.0.0.1", int(port_text), role or None)


def parse_allow(texts: Iterable[str]) -> tuple[Network, ...]:
    """``--audiosocket-allow`` values (an address or a CIDR network); ValueError (one line) if malformed."""
    nets: list[Network] = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"bad --audiosocket-allow {text!r}: expected an address or network, "
                             "e.g. 10.0.0.5 or 10.0.0.0/24") from None
    return tuple(nets)


def _peer_allowed(address: str, allow: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_loopback or any(ip.version == net.version and ip in net for net in allow)


@dataclass
class _Connection:
    """One accepted connection and what it feeds."""

    sock: socket.socket
    peer: str  # "address:port"
    address: str
    session: AudioSocketSession
    handle: StreamHandle | None = None
    stream_id: str | None = None
    resume_at: float | None = None  # paused for the speed cap until then
    samples: int = 0


class AudioSocketSource:
    """Accepts AudioSocket connections on ``host:port``; one monitor stream per call.

    The socket is bound in the constructor, so a taken port is a
    :class:`~serstream.monitor.SourceError` (one line) before anything
    starts; ``port=0`` picks a free port. ``role``: every stream of this
    listener is that party of the call named by its UUID. A host other than
    loopback needs ``config.allow`` (ValueError otherwise).
    """

    def __init__(
        self,
        monitor: Monitor,
        host: str,
        port: int,
        role: str | None = None,
        config: AudioSocketConfig | None = None,
    ) -> None:
        self.monitor = monitor
        self.host = host
        self.role = role
        self.config = config or AudioSocketConfig()
        if not is_loopback_host(host) and not self.config.allow:
            raise ValueError(
                f"AudioSocket on {host} would accept calls from anyone: the protocol has no authentication. "
                "Name the peers with --audiosocket-allow ADDRESS/NETWORK (e.g. your Asterisk server), "
                "or listen on 127.0.0.1"
            )
        self._listener = self._bind(host, port)
        self.port: int = int(self._listener.getsockname()[1])
        self._where = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.label = f"audiosocket@{self._where}"
        self._conns: dict[int, _Connection] = {}
        self._by_address: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "streams_opened", "messages", "bytes", "samples", "dtmf", "hangups", "closes",
             "open_failures", "refused_samples", "speed_waits", "backpressure_waits", "accept_failures",
             "sink_failures"), 0)
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.rejects: dict[str, int] = {}
        self._closed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._announced: set[str] = set()
        self.error: str | None = None
        add = getattr(monitor, "add_stats_provider", None)
        if add is not None:
            add(self.drop_counters)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise SourceError(f"cannot listen for AudioSocket on {host}:{port}: {exc.strerror or exc}") from None
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SourceError(f"TCP port {port} on {host} is already in use; pick another "
                                  "--audiosocket HOST:PORT") from None
            raise SourceError(f"cannot listen for AudioSocket on {host}:{port}: {exc.strerror or exc}") from None
        return sock

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start accepting connections."""
        if self._thread is not None:
            raise SourceError(f"{self.label}: already started")
        self._thread = threading.Thread(target=self._run, name=f"audiosocket-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and stream (reason "shutdown"); safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._finish()

    def __enter__(self) -> AudioSocketSource:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ what it says

    @property
    def description(self) -> str:
        role = f" (role {self.role})" if self.role else ""
        return f"receiving Asterisk AudioSocket on {self._where}{role}"

    @property
    def stream_ids(self) -> list[str]:
        with self._lock:
            return [c.stream_id for c in self._conns.values() if c.stream_id is not None]

    def stats(self) -> dict[str, Any]:
        """Every counter of this listener (safe from any thread).

        ``rejects``: the session causes (docs/telephony.md has the table);
        ``refused``: connections closed before a session; ``closed``: the last
        closed streams' reason and samples.
        """
        with self._lock:
            return {
                "port": self.port,
                "role": self.role,
                "active": len(self._conns),
                **self.counters,
                "refused": dict(self.refused),
                "rejects": dict(self.rejects),
                "closed": dict(self._closed),
            }

    def drop_counters(self) -> dict[str, int]:
        """Flat totals for the monitor's ``stats.drops`` (names prefixed ``audiosocket_``)."""
        with self._lock:
            flat = {f"audiosocket_{name}": n for name, n in self.refused.items()}
            flat["audiosocket_refused_samples"] = self.counters["refused_samples"]
            flat["audiosocket_accept_failures"] = self.counters["accept_failures"]
            for cause in CAUSES:
                flat[f"audiosocket_rejected_{cause}"] = self.rejects.get(cause, 0)
            return flat

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, None)
        interval = self.config.poll_interval_s
        next_poll = time.monotonic() + interval
        try:
            while not self._stop.is_set():
                for key, _mask in selector.select(max(0.0, next_poll - time.monotonic())):
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(key.data)
                now = time.monotonic()
                if now >= next_poll:
                    self._poll(now)
                    next_poll = now + interval
        except Exception as exc:  # noqa: BLE001 - a bug here must be reported, not kill the process
            self.error = f"AudioSocket listener on {self._where} failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.error)
        finally:
            self._finish()
            selector.close()
            self._selector = None

    def _finish(self) -> None:
        for conn in list(self._conns.values()):
            self._end(conn, Ended("shutdown"))
        self._listener.close()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE (out of file descriptors): counted, said once
                with self._lock:
                    self.counters["accept_failures"] += 1
                    count = self.counters["accept_failures"]
                self._announce("accept_failed", f"{self.label}: accept failed: {exc.strerror or exc}", count)
                return
            address = str(addr[0])
            peer = f"{address}:{addr[1]}"
            cause = None
            if not _peer_allowed(address, self.config.allow):
                cause = "refused_address"
            elif len(self._conns) >= self.config.max_connections:
                cause = "refused_busy"
            elif self._by_address.get(address, 0) >= self.config.max_per_address:
                cause = "refused_busy_address"
            if cause is not None:
                sock.close()
                with self._lock:
                    self.refused[cause] += 1
                    count = self.refused[cause]
                self._announce(cause, f"{self.label}: closed a connection from {peer}: "
                               + _REFUSAL_TEXT[cause].format(cfg=self.config), count)
                continue
            sock.setblocking(False)
            conn = _Connection(sock, peer, address, AudioSocketSession(self.config.session, time.monotonic()))
            with self._lock:
                self._conns[sock.fileno()] = conn
                self._by_address[address] = self._by_address.get(address, 0) + 1
                self.counters["connections"] += 1
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        size = _READ_BYTES
        handle = conn.handle
        if handle is None:
            size = _FIRST_READ_BYTES  # no ring to measure yet: the UUID and the first few frames
        elif not handle.closed:
            room = handle.free_space
            if room < handle.capacity // 4:
                # The stream's ring is nearly full (the pipeline is behind): wait rather than overwrite.
                now = time.monotonic()
                conn.session.hold(now + _BACKPRESSURE_S)
                self._pause(conn, now + _BACKPRESSURE_S, "backpressure_waits")
                return
            size = min(size, 2 * room)  # at most what the ring can take (16-bit samples)
        try:
            data = conn.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by the peer: the same as a close
        now = time.monotonic()
        session = conn.session
        before = (session.messages, session.bytes, session.samples, session.dtmf)
        produced = session.feed(data, now) if data else session.eof(now)
        with self._lock:
            for key, old, new in zip(("messages", "bytes", "samples", "dtmf"), before,
                                     (session.messages, session.bytes, session.samples, session.dtmf)):
                self.counters[key] += new - old
        self._apply(conn, produced)
        if session.ended:
            return
        delay = session.pace_delay(now)
        if delay > 0:
            self._pause(conn, now + delay, "speed_waits")

    def _pause(self, conn: _Connection, until: float, counter: str) -> None:
        """Stop reading ``conn`` until ``until``: not reading is the point, TCP slows the peer down."""
        if self._selector is None or conn.resume_at is not None:
            return
        self._selector.unregister(conn.sock)
        conn.resume_at = until
        with self._lock:
            self.counters[counter] += 1

    def _poll(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.resume_at is not None and now >= conn.resume_at and self._selector is not None:
                conn.resume_at = None
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._apply(conn, conn.session.poll(now))

    # ------------------------------------------------------------ decisions -> monitor

    def _apply(self, conn: _Connection, produced: Iterable[Output]) -> None:
        pending: list[np.ndarray] = []
        for item in produced:
            if isinstance(item, Audio):
                pending.append(item.samples)
                continue
            self._flush(conn, pending)
            if isinstance(item, Start):
                self._open(conn, item)
            elif isinstance(item, Rejected):
                self._count_cause(conn, item.cause, item.message)
            elif isinstance(item, Ended):
                self._end(conn, item)
        self._flush(conn, pending)

    def _flush(self, conn: _Connection, pending: list[np.ndarray]) -> None:
        if not pending:
            return
        samples = pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending.clear()
        if conn.handle is None or conn.handle.closed:  # refused, or ended by the monitor (failure, stop)
            with self._lock:
                self.counters["refused_samples"] += int(samples.size)
            return
        conn.handle.push(samples)
        conn.samples += int(samples.size)

    def _open(self, conn: _Connection, start: Start) -> None:
        if start.restart and conn.handle is not None:
            conn.handle.close(reason="format_changed")
            self._remember(conn, "format_changed")
        call = str(start.call_uuid)
        base = f"audiosocket:{call}" + (f":{self.role}" if self.role else "")
        detail = f"from {conn.peer} on {self._where}"
        try:
            handle = self.monitor.open_stream(
                base, source="audiosocket", codec="pcm_s16le", sample_rate=start.sample_rate, channels=1,
                detail=detail, unique=True, call=call if self.role else None, role=self.role,
            )
        except MonitorError as exc:
            conn.handle, conn.stream_id = None, None
            with self._lock:
                self.counters["open_failures"] += 1
                count = self.counters["open_failures"]
            self._announce("stream_refused", f"AudioSocket call {call} ({detail}) refused by the monitor: "
                           f"{' '.join(str(exc).split())}; its audio is counted in audiosocket_refused_samples",
                           count)
            return
        with self._lock:
            conn.handle, conn.stream_id = handle, handle.stream_id
            conn.samples = 0
            self.counters["streams_opened"] += 1

    def _count_cause(self, conn: _Connection, cause: str, text: str) -> None:
        with self._lock:
            self.rejects[cause] = self.rejects.get(cause, 0) + 1
            count = self.rejects[cause]
        where = conn.stream_id or f"a connection from {conn.peer}"
        self._announce(cause, f"{self.label}: {where}: {text}", count, conn.stream_id)

    def _end(self, conn: _Connection, end: Ended) -> None:
        if end.cause is not None:
            self._count_cause(conn, end.cause, end.message)
        with self._lock:
            self._conns.pop(conn.sock.fileno(), None)
            left = self._by_address.get(conn.address, 1) - 1
            if left > 0:
                self._by_address[conn.address] = left
            else:
                self._by_address.pop(conn.address, None)
            self.counters["hangups" if end.reason == "hangup" else "closes"] += 1
        if self._selector is not None and conn.resume_at is None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        if conn.handle is not None:
            conn.handle.close(reason=end.reason)
            self._remember(conn, end.reason)
            conn.handle = None

    def _remember(self, conn: _Connection, reason: str) -> None:
        if conn.stream_id is None:
            return
        with self._lock:
            self._closed[conn.stream_id] = {"reason": reason, "samples": conn.samples}
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)

    def _announce(self, cause: str, message: str, count: int, stream: str | None = None) -> None:
        """One log line and one ``error`` event per cause on this listener."""
        if cause in self._announced:
            return
        self._announced.add(cause)
        log.warning("%s (further cases are counted, not logged)", message)
        try:
            event = events.error_event(stream or self.label, code=cause, message=message, count=count,
                                       ts=time.time())
            emit = getattr(self.monitor, "emit", None) or self.monitor.sink
            emit(event)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the listener
            with self._lock:
                self.counters["sink_failures"] += 1


_REFUSAL_TEXT = {
    "refused_address": "the address is not loopback and not in --audiosocket-allow",
    "refused_busy": "{cfg.max_connections} connections are open (--audiosocket-max-connections)",
    "refused_busy_address": "{cfg.max_per_address} connections from that address are open "
                            "(--audiosocket-max-per-address)",
}


# --------------------------------------------------------------------------- command line


def add_audiosocket_arguments(parser: argparse.ArgumentParser) -> None:
    """``--audiosocket`` and its options (``listen`` and ``serve``)."""
    session = SessionConfig()
    config = AudioSocketConfig()
    parser.add_argument("--audiosocket", action="append", default=[], metavar="HOST:PORT[=ROLE]",
                        help="accept Asterisk AudioSocket calls on HOST:PORT (TCP, repeatable); =ROLE (e.g. "
                        "=caller, =callee) makes each call's stream that party of the call named by its UUID")
    parser.add_argument("--audiosocket-allow", action="append", default=[], metavar="ADDRESS/NETWORK",
                        help="peers accepted besides loopback (repeatable); required to listen off loopback, "
                        "since AudioSocket has no authentication")
    parser.add_argument("--audiosocket-idle-timeout", type=float, default=session.idle_timeout_s,
                        metavar="SECONDS", help="close a call after SECONDS without a message (default "
                        f"{session.idle_timeout_s:g})")
    parser.add_argument("--audiosocket-max-connections", type=int, default=config.max_connections, metavar="N",
                        help=f"open connections per listener (default {config.max_connections})")
    parser.add_argument("--audiosocket-max-per-address", type=int, default=config.max_per_address, metavar="N",
                        help=f"open connections per peer address (default {config.max_per_address})")
    parser.add_argument("--audiosocket-max-speed", type=float, default=session.max_speed, metavar="X",
                        help="stop reading a call beyond X times real time after a 5 s burst (default "
                        f"{session.max_speed:g}; 0 = no cap)")


def audiosocket_sources_from_args(monitor: Monitor, args: argparse.Namespace) -> list[AudioSocketSource]:
    """One bound listener per ``--audiosocket``; ValueError or SourceError (one line) on a bad value or port.

    Every port is bound before any starts, so a taken port fails the whole
    set cleanly; the caller starts them.
    """
    specs = [parse_listen_spec(text) for text in getattr(args, "audiosocket", None) or []]
    if not specs:
        return []
    speed = args.audiosocket_max_speed
    config = AudioSocketConfig(
        session=SessionConfig(idle_timeout_s=args.audiosocket_idle_timeout,
                              max_speed=None if not speed else float(speed)),
        max_connections=args.audiosocket_max_connections, max_per_address=args.audiosocket_max_per_address,
        allow=parse_allow(args.audiosocket_allow),
    )
    sources: list[AudioSocketSource] = []
    try:
        for spec in specs:
            sources.append(AudioSocketSource(monitor, spec.host, spec.port, spec.role, config))
    except (ValueError, SourceError):
        for source in sources:
            source.stop()
        raise
    return sources
