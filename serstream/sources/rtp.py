"""RTP over UDP: one port's datagrams into monitor streams, one stream per SSRC.

The thin I/O adapter around the pure :class:`~serstream.rtp.RtpDemux`: a
thread of its own owns a real UDP socket (and the RTCP socket on the next
port), hands every datagram with its arrival time to the demux, polls the
demux every ``poll_interval_s`` so held packets leave and idle streams close,
and turns the demux events into monitor calls:

* ``StreamOpened``  -> ``monitor.open_stream("rtp:<ssrc>", source="rtp", codec="pcmu"|"pcma"|"l16",
  sample_rate=<native>, unique=True)`` (the monitor's resampler takes 8 kHz to 16 kHz;
  an id already open, e.g. the same SSRC on another port, gets the usual ``-2`` suffix);
* ``StreamAudio``   -> ``handle.push(samples)`` (one push per stream per socket drain, not per packet);
* ``StreamClosed``  -> ``handle.close(reason)`` (``"idle"`` after ``idle_timeout_s`` without packets);
* ``RejectNotice``  -> one log line and one ``error`` event (code = the reject cause), once per cause.

A thread, not the asyncio loop, because at a few hundred calls the packet rate
is tens of thousands per second: that work must not delay the WebSocket
server's loop, and ``StreamHandle.push`` never blocks, so the thread never
waits on anything but its socket.

Nothing is dropped silently: datagrams the kernel dropped because the socket
buffer was full are counted (Linux ``SO_RXQ_OVFL``), every datagram the demux
refused is counted per cause, lost / duplicate / late packets per stream come
from the jitter buffers, and audio of an SSRC the monitor refused to open is
counted too. :meth:`RtpSource.stats` has them all; :meth:`RtpSource.drop_counters`
gives flat totals that each source registers with
``Monitor.add_stats_provider``, so they appear in ``stats.drops`` and
``/metrics`` (``serstream_drops_total{cause="rtp_lost"}``, ...).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from serstream import events
from serstream.codecs import rtp_codec
from serstream.monitor import MonitorError, SourceError
from serstream.rtp import (
    DemuxConfig,
    JitterConfig,
    PayloadFormat,
    RejectNotice,
    RtpDemux,
    StreamAudio,
    StreamClosed,
    StreamOpened,
    build_payload_map,
)

if TYPE_CHECKING:
    from serstream.monitor import Monitor, StreamHandle

__all__ = [
    "RtpSourceConfig",
    "RtpSource",
    "parse_listen_address",
    "register_stats_provider",
]

log = logging.getLogger(__name__)

# Linux: a socket option whose ancillary data carries the socket's count of
# datagrams dropped for lack of buffer space (absent from Python's socket module).
_SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40 if sys.platform.startswith("linux") else None)
_MAX_DATAGRAM = 65_535
# Datagrams read per socket before the loop looks at the clock again (keeps polls on time).
_DRAIN_LIMIT = 512
# Closed streams whose final counters stay visible in stats().
_CLOSED_KEPT = 256


@dataclass(frozen=True)
class RtpSourceConfig:
    """Settings of one RTP port."""

    idle_timeout_s: float = 5.0  # a stream with no packet for this long is closed ("idle")
    max_streams: int = 512  # concurrent SSRCs on this port; more are rejected (flood guard)
    poll_interval_s: float = 0.02  # how often held packets are released and idle streams closed
    rtcp: bool = True  # bind port+1 and count (ignore) RTCP there
    receive_buffer_bytes: int = 4 << 20  # SO_RCVBUF asked for (the kernel may cap it)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    max_speed: float | None = 2.0  # one SSRC's cap, times real time, after burst_s ("flood"); None: off
    burst_s: float = 5.0  # seconds of audio an SSRC may send ahead of that cap

    def __post_init__(self) -> None:
        if not 0.005 <= self.poll_interval_s <= 0.1:
            raise ValueError(f"poll_interval_s must be in 0.005-0.1 s, got {self.poll_interval_s}")
        if self.receive_buffer_bytes < 0:
            raise ValueError(f"receive_buffer_bytes must be >= 0, got {self.receive_buffer_bytes}")
        # DemuxConfig validates idle_timeout_s and max_streams.
        self.demux_config()

    def demux_config(self) -> DemuxConfig:
        return DemuxConfig(idle_timeout_s=self.idle_timeout_s, max_streams=self.max_streams, jitter=self.jitter,
                           max_speed=self.max_speed, burst_s=self.burst_s)


def parse_listen_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); SourceError if malformed."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise SourceError(f"bad RTP address {text!r}: write an IPv6 address in brackets, e.g. [::1]:5004")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SourceError(f"bad RTP address {text!r}: expected HOST:PORT with a port 0-65535, e.g. 127.0.0.1:5004")
    return host or default_host, int(port_text)


def _bind_udp(host: str, port: int, receive_buffer: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SourceError(f"cannot listen for RTP on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if receive_buffer:
            # A burst of calls must fit while the thread is busy; a refusal only costs headroom.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            except OSError:
                pass
        if _SO_RXQ_OVFL is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            except OSError:
                pass
        sock.bind(address)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SourceError(
                f"UDP port {port} on {host} is already in use; pick another --rtp HOST:PORT"
            ) from None
        raise SourceError(f"cannot listen for RTP on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@dataclass
class _Output:
    """One demux stream as the monitor sees it."""

    handle: StreamHandle | None  # None: the monitor refused the stream (its audio is counted)
    monitor_id: str
    samples: int = 0


class RtpSource:
    """Receives RTP on ``host:port`` (and RTCP on ``port + 1``) and feeds the monitor.

    The sockets are bound in the constructor, so a taken port is a
    :class:`~serstream.monitor.SourceError` with one line before anything
    starts. ``port=0`` picks a free even port whose successor is free too.
    Call :meth:`start`, then :meth:`stop` (closes every stream, reason
    ``"shutdown"``).
    """

    def __init__(
        self,
        monitor: Monitor,
        host: str,
        port: int,
        payload_map: Mapping[int, PayloadFormat] | None = None,
        config: RtpSourceConfig | None = None,
    ) -> None:
        self.monitor = monitor
        self.host = host
        self.config = config or RtpSourceConfig()
        self.payload_map = dict(build_payload_map() if payload_map is None else payload_map)
        self._rtp_sock, self._rtcp_sock = self._bind(host, port)
        self.port: int = int(self._rtp_sock.getsockname()[1])
        self.rtcp_port: int | None = int(self._rtcp_sock.getsockname()[1]) if self._rtcp_sock else None
        self.label = f"rtp@{host}:{self.port}"
        self._demux = RtpDemux(self.payload_map, self.config.demux_config())
        self._outputs: dict[str, _Output] = {}
        self._closed: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_drops = 0
        self._kernel_drop_base: dict[int, int] = {}
        self.rtcp_packets = 0
        self.rtcp_invalid = 0
        self.open_failures = 0
        self.refused_samples = 0
        self.sink_failures = 0
        self._announced: set[str] = set()
        self.error: str | None = None
        # The monitor sums the counters of every source that registers (several ports).
        register_stats_provider(monitor, self.drop_counters)

    # ------------------------------------------------------------ sockets

    def _bind(self, host: str, port: int) -> tuple[socket.socket, socket.socket | None]:
        if port != 0 or not self.config.rtcp:
            rtp = _bind_udp(host, port, self.config.receive_buffer_bytes)
            if not self.config.rtcp:
                return rtp, None
            try:
                return rtp, _bind_udp(host, port + 1, 0)
            except SourceError as exc:
                rtp.close()
                raise SourceError(f"RTCP port (RTP port + 1): {exc}; or turn RTCP off with --no-rtcp") from None
        # Port 0: let the kernel choose an even port whose successor is free (RFC 3550 §11).
        for _ in range(50):
            rtp = _bind_udp(host, 0, self.config.receive_buffer_bytes)
            chosen = rtp.getsockname()[1]
            if chosen % 2 == 0 and chosen < 65535:
                try:
                    return rtp, _bind_udp(host, chosen + 1, 0)
                except SourceError:
                    pass
            rtp.close()
        raise SourceError(f"cannot find a free pair of UDP ports for RTP and RTCP on {host}")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the receiving thread."""
        if self._thread is not None:
            raise SourceError(f"{self.label}: already started")
        self._thread = threading.Thread(target=self._run, name=f"rtp-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving, close every stream (reason "shutdown") and the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._finish()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> RtpSource:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ counters

    @property
    def description(self) -> str:
        return f"receiving RTP on {self.host}:{self.port}"

    @property
    def stream_ids(self) -> list[str]:
        """Monitor stream ids of the open streams."""
        with self._stats_lock:
            return [out.monitor_id for out in self._outputs.values()]

    def stats(self) -> dict[str, Any]:
        """Every counter of this port (safe from any thread).

        ``received`` = ``accepted`` + the sum of ``rejects``; ``kernel_drops``
        are datagrams that never reached us (socket buffer full). ``streams``
        has the open streams' jitter counters (``lost``, ``duplicates``,
        ``late``, ...) and ``samples`` pushed; ``closed`` the last closed ones.
        """
        with self._stats_lock:
            demux = self._demux
            streams = {}
            for demux_id, counters in demux.stream_stats().items():
                out = self._outputs.get(demux_id)
                name = out.monitor_id if out else demux_id
                streams[name] = {**counters, "samples": out.samples if out else 0}
            return {
                "port": self.port,
                "rtcp_port": self.rtcp_port,
                "received": demux.received,
                "accepted": demux.accepted,
                "rejects": dict(demux.rejects),
                "kernel_drops": self._kernel_drops,
                "rtcp_packets": self.rtcp_packets,
                "rtcp_invalid": self.rtcp_invalid,
                "open_failures": self.open_failures,
                "refused_samples": self.refused_samples,
                "totals": demux.totals(),
                "streams": streams,
                "closed": dict(self._closed),
            }

    def drop_counters(self) -> dict[str, int]:
        """Flat totals for the monitor's ``stats.drops`` (names prefixed ``rtp_``)."""
        s = self.stats()
        totals = s["totals"]
        flat = {
            "rtp_kernel_drops": s["kernel_drops"],
            "rtp_lost": totals.get("lost", 0),
            "rtp_duplicates": totals.get("duplicates", 0),
            "rtp_late": totals.get("late", 0),
            "rtp_stray": totals.get("stray", 0),
            "rtp_refused_samples": s["refused_samples"],
            "rtp_rtcp_invalid": s["rtcp_invalid"],
        }
        for cause, count in s["rejects"].items():
            if cause != "rtcp":  # RTCP muxed on the RTP port is normal traffic, not a drop
                flat[f"rtp_rejected_{cause}"] = count
        return flat

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._rtp_sock, selectors.EVENT_READ, self._drain_rtp)
        if self._rtcp_sock is not None:
            selector.register(self._rtcp_sock, selectors.EVENT_READ, self._drain_rtcp)
        interval = self.config.poll_interval_s
        next_poll = time.monotonic() + interval
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_poll - time.monotonic())
                for key, _mask in selector.select(timeout):
                    key.data()
                now = time.monotonic()
                if now >= next_poll:
                    with self._stats_lock:
                        produced = self._demux.poll(now)
                    self._apply(produced)
                    next_poll = now + interval
        except Exception as exc:  # noqa: BLE001 - a bug here must be reported, not kill the process
            self.error = f"RTP receiver on {self.host}:{self.port} failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.error)
        finally:
            selector.close()
            self._finish()

    def _finish(self) -> None:
        with self._stats_lock:
            produced = self._demux.close_all(time.monotonic(), "shutdown")
        self._apply(produced)
        for sock in (self._rtp_sock, self._rtcp_sock):
            if sock is not None:
                sock.close()

    def _recv(self, sock: socket.socket) -> tuple[bytes, Any] | None:
        try:
            if _SO_RXQ_OVFL is None:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
                return data, addr
            data, ancillary, _flags, addr = sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(4))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            # e.g. ECONNREFUSED reported for an earlier send on this socket: nothing to read.
            return None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(payload) >= 4:
                self._note_kernel_drops(sock.fileno(), struct.unpack("=I", payload[:4])[0])
        return data, addr

    def _note_kernel_drops(self, fd: int, cumulative: int) -> None:
        # The kernel reports a running total per socket (32 bits, wraps).
        previous = self._kernel_drop_base.get(fd, 0)
        self._kernel_drop_base[fd] = cumulative
        self._kernel_drops += (cumulative - previous) % (1 << 32)

    def _drain_rtp(self) -> None:
        demux = self._demux
        produced: list[Any] = []
        for _ in range(_DRAIN_LIMIT):
            got = self._recv(self._rtp_sock)
            if got is None:
                break
            data, addr = got
            now = time.monotonic()
            with self._stats_lock:
                produced.extend(demux.receive(data, addr, now))
        if produced:
            self._apply(produced)

    def _drain_rtcp(self) -> None:
        assert self._rtcp_sock is not None
        for _ in range(_DRAIN_LIMIT):
            got = self._recv(self._rtcp_sock)
            if got is None:
                return
            data, _addr = got
            self.rtcp_packets += 1
            # RTCP: version 2, packet type 192-223 (RFC 5761); anything else is counted as junk.
            if len(data) < 4 or data[0] >> 6 != 2 or not 192 <= data[1] <= 223:
                self.rtcp_invalid += 1

    # ------------------------------------------------------------ demux events -> monitor

    def _apply(self, produced: Iterable[Any]) -> None:
        # Audio of one drain is gathered per stream, so the monitor sees one push per stream.
        pending: dict[str, list[np.ndarray]] = {}
        for item in produced:
            if isinstance(item, StreamAudio):
                pending.setdefault(item.stream_id, []).append(item.samples)
            elif isinstance(item, StreamOpened):
                self._flush_audio(pending)
                self._open(item)
            elif isinstance(item, StreamClosed):
                self._flush_audio(pending)
                self._close(item)
            elif isinstance(item, RejectNotice):
                self._announce(item.cause, item.message)
        self._flush_audio(pending)

    def _flush_audio(self, pending: dict[str, list[np.ndarray]]) -> None:
        for demux_id, pieces in pending.items():
            out = self._outputs.get(demux_id)
            samples = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            if out is None or out.handle is None:
                self.refused_samples += int(samples.size)
                continue
            out.handle.push(samples)
            out.samples += int(samples.size)
        pending.clear()

    def _open(self, opened: StreamOpened) -> None:
        addr = opened.addr
        sender = f"{addr[0]}:{addr[1]}" if len(addr) >= 2 else str(addr)
        detail = f"from {sender} on {self.host}:{self.port}"
        fmt = opened.fmt
        handle = None
        monitor_id = opened.stream_id
        error = ""
        # The id can be taken by the same SSRC on another port, or by this stream still
        # closing after a clock-rate change: the monitor then gives it the next free suffix.
        try:
            handle = self.monitor.open_stream(
                opened.stream_id, source="rtp", codec=rtp_codec(fmt.encoding).stream_codec, sample_rate=fmt.rate,
                channels=fmt.channels, detail=detail, unique=True,
            )
            monitor_id = handle.stream_id
        except MonitorError as exc:
            error = " ".join(str(exc).split())
        with self._stats_lock:
            self._outputs[opened.stream_id] = _Output(handle, monitor_id)
        if handle is None:
            self.open_failures += 1
            self._announce("stream_refused", f"RTP stream {opened.stream_id} ({detail}) refused by the "
                           f"monitor: {error}; its audio is counted in rtp_refused_samples")

    def _close(self, closed: StreamClosed) -> None:
        with self._stats_lock:
            out = self._outputs.pop(closed.stream_id, None)
            if out is None:
                return
            self._closed[out.monitor_id] = {**closed.stats, "samples": out.samples}
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)
        if out.handle is not None:
            out.handle.close(reason=closed.reason)

    def _announce(self, cause: str, message: str) -> None:
        """One log line and one ``error`` event per cause on this port."""
        if cause in self._announced:
            return
        self._announced.add(cause)
        log.warning("%s", message)
        count = self.open_failures if cause == "stream_refused" else self._demux.rejects.get(cause, 1)
        try:
            event = events.error_event(self.label, code=cause, message=message, count=count, ts=time.time())
            emit = getattr(self.monitor, "emit", None) or self.monitor.sink
            emit(event)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the receiver
            self.sink_failures += 1


# --------------------------------------------------------------------------- stats hook


def register_stats_provider(monitor: Monitor, provider: Callable[[], Mapping[str, int]]) -> bool:
    """Ask the monitor to merge ``provider()`` into ``stats.drops``; False if it has no such hook.

    The hook the monitor needs: ``Monitor.add_stats_provider(fn)``, each
    ``fn() -> Mapping[str, int]`` merged into the ``drops`` of
    :meth:`Monitor.stats` (and so into ``stats`` events and ``/metrics``).
    """
    add = getattr(monitor, "add_stats_provider", None)
    if add is None:
        log.debug("the monitor has no add_stats_provider(); RTP counters are in RtpSource.stats() only")
        return False
    add(provider)
    return True
