"""The WebSocket server: events out to clients, audio in from clients, health and metrics.

One port (default 127.0.0.1:8765), built on the ``websockets`` asyncio API:

* ``/events`` (WebSocket): the event stream, every event as one text message;
  ``?stream=ID`` keeps only that stream's events (``stats`` events reach
  every client regardless); ``?since=ID`` first replays the events after that
  id still in the bus history (a ``gap`` event first when some are gone).
* ``/ingest`` (WebSocket): handed to the ``ingest_handler`` given to
  :class:`MonitorServer` (a client pushes audio there); closed with 1008
  "ingest not enabled" when there is none.
* Further audio-in WebSocket paths (``audio_routes``: ``/twilio`` Twilio Media
  Streams, ``/fork`` FreeSWITCH mod_audio_fork), each handed to its handler,
  capped like ``/ingest`` connections; their clients cannot set headers, so
  the token may ride in the URL query (``?token=...``) or, where the handler
  says it checks it (``checks_token``: ``/twilio`` reads it from the start
  message's ``customParameters``), be left to the handler; a handler may name
  the subprotocols it accepts (``subprotocols``: ``audio.drachtio.org`` on ``/fork``).
* ``/healthz`` (HTTP GET): ``health()`` as JSON; ``/metrics`` (HTTP GET):
  ``metrics()`` as Prometheus text (the monitor's ``prometheus_client``
  registry, :mod:`serstream.metrics`); ``/`` and the files of the dashboard
  directory (HTTP GET, no path traversal). Anything else is 404.

The plain HTTP routes are answered from ``process_request`` during the
opening handshake, so one ``websockets`` server serves everything.

Access (docs/security.md): with a ``token`` every route but ``/healthz``
needs it (``Authorization: Bearer``, the dashboard's subprotocol entry or its
cookie, which ``GET /auth`` sets; ``/ingest`` may also carry it in the
hello); a request with an ``Origin`` header must come from the server's own
origin or ``allow_origins``; subscribers, ingest clients and pending
handshakes are capped overall and per address. Every refusal is counted by
cause (:attr:`MonitorServer.refusals`) and logged once per cause. The pure
rules live in :mod:`serstream.access`. ``tls_cert``/``tls_key`` serve
``https://`` and ``wss://`` on the same port.

:class:`EventBus` is the fan-out: :meth:`EventBus.publish` serialises an
event once, gives it the next bus-wide ``id`` (spliced into the JSON as its
last field), keeps it in a bounded history (``--history-s``) and offers the
same bytes to every matching :class:`Subscription` and listener (the
recorder). Each subscription is a bounded drop-oldest buffer, so a slow
client loses its oldest events (counted per subscription and in
``EventBus.events_dropped``, and announced to it by a ``gap`` event) and
never slows the publisher or the other clients. The bus lives on the event loop: call ``publish`` in the loop, or
:meth:`EventBus.publish_threadsafe` from any other thread.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import mimetypes
import re
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from serstream.access import (
    REFUSAL_CAUSES,
    SUBPROTOCOL,
    ConnectionLimits,
    Credentials,
    LimitsConfig,
    bearer_from_header,
    cookie_from_header,
    cookie_name,
    credentials_ok,
    dashboard_cookie_value,
    origin_allowed,
    token_from_subprotocols,
)
from serstream.core.history import (
    DEFAULT_HISTORY_MAX,
    DEFAULT_HISTORY_S,
    EventHistory,
    HistoryEntry,
    ResumePlan,
    parse_since,
)
from serstream.errors import ServerError
from serstream.events import STATS_STREAM, dumps, gap_event
from serstream.metrics import prometheus_text  # re-exported: /metrics text comes from serstream/metrics.py

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServerError",
    "Subscription",
    "EventBus",
    "EventListener",
    "DEFAULT_HISTORY_S",
    "DEFAULT_HISTORY_MAX",
    "MonitorServer",
    "IngestHandler",
    "send_events",
    "default_dashboard_dir",
    "prometheus_text",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The fields of ``health()`` that ``/healthz`` shows: liveness only, nothing about streams
#: (the route is open even when a token is set).
HEALTH_FIELDS = ("status", "pipeline", "inference", "device", "model", "uptime_s")

#: Called with the ``/ingest`` connection and its handshake request; runs until the client is done.
IngestHandler = Callable[[ServerConnection, Request], Awaitable[None]]


@dataclass(frozen=True)
class WebSocketRoute:
    """One WebSocket path of the routing table: who serves it and under which connection cap.

    ``limit``: the :class:`~serstream.access.ConnectionLimits` class (``events``
    or ``ingest``). ``query_token``: the token may be given as ``?token=`` (for
    clients such as Twilio and FreeSWITCH that connect to a URL and cannot set
    headers). ``hello_token``: without credentials in the handshake the handler
    checks the token itself (``/ingest``'s hello). ``subprotocols``: selected
    when offered (besides the dashboard's ``serstream``).
    """

    serve: Callable[[ServerConnection], Awaitable[None]]
    limit: str
    query_token: bool = False
    hello_token: bool = False
    subprotocols: tuple[str, ...] = ()


def default_dashboard_dir() -> Path:
    """The dashboard of a checkout (``clients/dashboard``), else the copy installed with the package.

    In the checkout ``serstream/dashboard`` holds symlinks to ``clients/dashboard`` (served from
    there: the static handler refuses links that leave its root); a wheel gets the files themselves.
    """
    checkout = Path(__file__).resolve().parent.parent / "clients" / "dashboard"
    return checkout if (checkout / "index.html").is_file() else Path(__file__).with_name("dashboard")


# --------------------------------------------------------------------------- bus


class Subscription:
    """One consumer's bounded, drop-oldest buffer of numbered, serialised events (UTF-8 JSON bytes).

    A subscription made with ``since`` starts with a replay of the events it
    missed (held apart from the live buffer, so the replay is never cut by
    ``maxlen``). When the live buffer overflows, the oldest events are dropped
    and the next :meth:`get` first returns a ``gap`` event saying how many
    were lost, so the client sees the loss instead of a silent jump in ids.
    """

    def __init__(self, bus: EventBus, stream: str | None, maxlen: int) -> None:
        if maxlen <= 0:
            raise ValueError(f"subscription buffer must hold at least 1 event, got {maxlen}")
        self.bus = bus
        #: Only this stream's events (plus stats); None: every event.
        self.stream = stream
        self.maxlen = int(maxlen)
        self.dropped = 0
        self.delivered = 0
        #: ``gap`` events sent to this consumer (overflow, history, restart or future).
        self.gaps = 0
        self.closed = False
        #: The id of the last event handed out (0: none yet).
        self.last_id = 0
        self._replay: deque[bytes] = deque()
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._lost = 0
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"Subscription(stream={self.stream!r}, pending={self.pending}, "
            f"dropped={self.dropped}, closed={self.closed})"
        )

    @property
    def pending(self) -> int:
        return len(self._replay) + len(self._buffer)

    def wants(self, stream: str, is_stats: bool) -> bool:
        return self.stream is None or is_stats or stream == self.stream

    def _start(self, plan: ResumePlan) -> None:
        """Queue a resume plan (gap event first, then the missed events) before any live event."""
        if plan.gap:
            self._replay.append(self._gap_payload(plan.reason or "history", plan.lost, plan.since,
                                                  plan.resume_from))
        self._replay.extend(entry.payload for entry in plan.entries)
        if self._replay:
            self._wakeup.set()

    def offer(self, event_id: int, payload: bytes) -> None:
        """Buffer one event; when full, the oldest buffered event is dropped (and counted)."""
        if self.closed:
            return
        if len(self._buffer) >= self.maxlen:
            self._buffer.popleft()
            self.dropped += 1
            self._lost += 1
            self.bus.events_dropped += 1
        self._buffer.append((event_id, payload))
        self._wakeup.set()

    def get_nowait(self) -> bytes | None:
        """The next event (a ``gap`` event first when some were dropped), or None when there is none."""
        if self._replay:
            self.delivered += 1
            return self._replay.popleft()
        if not self._buffer:
            return None
        if self._lost:
            lost, self._lost = self._lost, 0
            return self._gap_payload("overflow", lost, self.last_id, self._buffer[0][0])
        event_id, payload = self._buffer.popleft()
        self.last_id = event_id
        self.delivered += 1
        return payload

    async def get(self) -> bytes | None:
        """Wait for the next event; None once the subscription is closed."""
        while not self.closed:
            payload = self.get_nowait()
            if payload is not None:
                return payload
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    def _gap_payload(self, reason: str, lost: int, since: int, resume_from: int) -> bytes:
        self.gaps += 1
        self.bus.gaps_sent += 1
        event = gap_event(self.stream or STATS_STREAM, reason=reason, lost=lost, since=since,
                          resume_from=resume_from, ts=time.time())
        return dumps(event).encode("utf-8")

    def close(self) -> None:
        """Stop receiving; wakes a waiting :meth:`get` (which returns None)."""
        if not self.closed:
            self.closed = True
            self._buffer.clear()
            self._replay.clear()
            self._wakeup.set()
            self.bus.unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        payload = await self.get()
        if payload is None:
            raise StopAsyncIteration
        return payload


#: Called in the loop with every numbered event (e.g. the recorder's ``offer``).
EventListener = Callable[[HistoryEntry], None]


def _with_id(payload: bytes, event_id: int) -> bytes:
    """The serialised event with ``"id":N`` as its last field (no second serialisation).

    Last, not first: consumers may test the prefix (``{"type":"stats"``), as
    the ingest handler does, and a field's position carries no meaning in JSON.
    """
    body = payload.rstrip()
    if body[:1] != b"{" or body[-1:] != b"}":
        raise ValueError("an event must serialise to a JSON object")
    sep = b"" if body[1:-1].strip() == b"" else b","
    return body[:-1] + sep + b'"id":' + str(event_id).encode("ascii") + b"}"


class EventBus:
    """Fan-out of numbered events to subscriptions, with a bounded history; lives on one event loop.

    Every published event gets the next bus-wide ``id`` and is kept in an
    :class:`~serstream.core.history.EventHistory` for ``history_s`` seconds
    (at most ``history_max`` events), so :meth:`subscribe` with ``since``
    can replay what a reconnecting client missed. ``first_id``: the number
    of the first event; the CLI passes
    :func:`~serstream.core.history.run_first_id` so that ids of a later run
    exceed those of an earlier one.
    """

    #: Events handed over by other threads and not yet delivered by the loop.
    #: Past this the loop is not keeping up (stalled, or starved of CPU): newer
    #: events are dropped and counted rather than queued without bound.
    MAX_PENDING_HANDOFF = 4096

    def __init__(
        self,
        history_s: float = DEFAULT_HISTORY_S,
        history_max: int = DEFAULT_HISTORY_MAX,
        clock: Callable[[], float] = time.monotonic,
        first_id: int = 1,
    ) -> None:
        self._subscriptions: set[Subscription] = set()
        self.history = EventHistory(max_age_s=float(history_s), max_events=int(history_max),
                                    first_id=int(first_id))
        self._clock = clock
        self._listeners: list[EventListener] = []
        self.events_published = 0
        #: Events dropped for slow consumers, summed over every subscription ever made,
        #: plus those refused at the thread handoff (``handoff_dropped``).
        self.events_dropped = 0
        self.handoff_dropped = 0
        #: ``gap`` events sent to clients; listener calls that raised.
        self.gaps_sent = 0
        self.listener_failures = 0
        self._pending = 0
        self._pending_lock = threading.Lock()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @property
    def last_id(self) -> int:
        """The id of the last event published (0 before the first)."""
        return self.history.last_id

    @property
    def pending_handoff(self) -> int:
        """Events handed over by other threads that the loop has not published yet."""
        return self._pending

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener`` (in the loop, must not block) with every numbered event from now on."""
        self._listeners.append(listener)

    def subscribe(self, stream: str | None = None, maxlen: int = 1000, since: int | None = None) -> Subscription:
        """A new subscription to ``stream``'s events (None: all streams); stats always included.

        With ``since`` (the last id the client saw) the subscription first
        yields the events after it still in the history (a ``gap`` event
        first when some have left it), then the live feed: both are taken
        here, in the loop, so nothing is lost or repeated at the seam.
        """
        sub = Subscription(self, stream or None, maxlen)
        if since is not None:
            sub._start(self.history.resume(int(since), sub.wants, self._clock()))
        sub.last_id = self.history.last_id
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, event: Mapping[str, Any]) -> int:
        """Serialise ``event`` once, number it and offer it to every matching subscription (in the loop)."""
        return self.publish_payload(
            dumps(event).encode("utf-8"),
            str(event.get("stream", "")),
            event.get("type") == "stats",
        )

    def publish_payload(self, payload: bytes, stream: str, is_stats: bool = False) -> int:
        """Number already-serialised JSON (UTF-8), keep it, offer it to matching subscriptions; its id."""
        self.events_published += 1
        event_id = self.history.next_id()
        numbered = _with_id(payload, event_id)
        entry = HistoryEntry(event_id, self._clock(), stream, numbered, is_stats)
        self.history.append(entry)
        for sub in tuple(self._subscriptions):
            if sub.wants(stream, is_stats):
                sub.offer(event_id, numbered)
        for listener in self._listeners:
            try:
                listener(entry)
            except Exception as exc:  # noqa: BLE001 - a listener's bug must not stop the fan-out
                self.listener_failures += 1
                if self.listener_failures == 1:
                    log.error("event listener failed: %s: %s", type(exc).__name__, exc)
        return event_id

    def publish_threadsafe(self, loop: asyncio.AbstractEventLoop, event: Mapping[str, Any]) -> bool:
        """Publish from another thread: serialise here, number and deliver on ``loop``.

        Returns False (and counts the event in ``events_dropped``) when the
        loop is already closed, or when :data:`MAX_PENDING_HANDOFF` events
        are already waiting for it (also counted in ``handoff_dropped``).
        Such an event never gets an id, so no client can see it missing.
        """
        with self._pending_lock:
            if self._pending >= self.MAX_PENDING_HANDOFF:
                self.events_dropped += 1
                self.handoff_dropped += 1
                return False
            self._pending += 1
        payload = dumps(event).encode("utf-8")
        stream = str(event.get("stream", ""))
        is_stats = event.get("type") == "stats"
        try:
            loop.call_soon_threadsafe(self._deliver_handoff, payload, stream, is_stats)
        except RuntimeError:  # loop closed: nobody left to deliver to
            with self._pending_lock:
                self._pending -= 1
                self.events_dropped += 1
            return False
        return True

    def _deliver_handoff(self, payload: bytes, stream: str, is_stats: bool) -> None:
        with self._pending_lock:
            self._pending -= 1
        self.publish_payload(payload, stream, is_stats)


async def send_events(conn: ServerConnection, sub: Subscription) -> None:
    """Send ``sub``'s events to ``conn`` as text messages until either closes.

    The ``/events`` route uses it, and so can an ingest handler that streams
    its own stream's events back. It closes ``sub`` when it returns. Someone
    must read ``conn`` meanwhile (the ingest handler does; ``/events`` runs a
    reader that discards), or a closed client is noticed only at the next send.
    """
    try:
        async for payload in sub:
            await conn.send(payload, text=True)
    except ConnectionClosed:
        pass
    finally:
        sub.close()


# --------------------------------------------------------------------------- server


class MonitorServer:
    """The one-port WebSocket + HTTP server around an :class:`EventBus`."""

    def __init__(
        self,
        bus: EventBus,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        health: Callable[[], Mapping[str, Any]],
        metrics: Callable[[], str],
        dashboard_dir: Path | None = None,
        max_message_bytes: int = 1 << 20,
        ingest_handler: IngestHandler | None = None,
        audio_routes: Mapping[str, IngestHandler] | None = None,
        client_buffer: int = 1000,
        close_timeout: float = 2.0,
        token: str | None = None,
        allow_origins: Iterable[str] = (),
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        limits: LimitsConfig | None = None,
        open_timeout: float = 10.0,
        keepalive: float | None = 20.0,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        # A certificate file may hold its key too (tls_key None), as load_cert_chain allows.
        if tls_key is not None and tls_cert is None:
            raise ValueError("a TLS key needs its certificate (--tls-cert)")
        self.bus = bus
        self.host = host
        self.requested_port = int(port)
        self.health = health
        self.metrics = metrics
        self.dashboard_dir = Path(dashboard_dir).resolve() if dashboard_dir is not None else None
        self.max_message_bytes = int(max_message_bytes)
        self.ingest_handler = ingest_handler
        #: The WebSocket routing table: path -> route (plain HTTP paths are answered in process_request).
        self.routes: dict[str, WebSocketRoute] = {
            "/events": WebSocketRoute(self._serve_events_route, "events"),
            "/ingest": WebSocketRoute(self._serve_ingest, "ingest", hello_token=True),
        }
        for path, audio_handler in (audio_routes or {}).items():
            if not path.startswith("/") or path in self.routes:
                raise ValueError(f"audio route {path!r} must be a new path starting with /")
            # A handler may check the token itself in its first message (``checks_token``, as
            # /twilio does in its start) and name the subprotocols its clients offer.
            self.routes[path] = WebSocketRoute(
                self._audio_route(path, audio_handler), "ingest", query_token=True,
                hello_token=bool(getattr(audio_handler, "checks_token", False)),
                subprotocols=tuple(getattr(audio_handler, "subprotocols", ())),
            )
        self.client_buffer = int(client_buffer)
        self.close_timeout = float(close_timeout)
        #: The shared secret; None: no authentication (only sensible on loopback).
        self.token = token
        self.allow_origins = tuple(allow_origins)
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.limits = ConnectionLimits(limits or LimitsConfig())
        self.open_timeout = float(open_timeout)
        self.keepalive = None if not keepalive else float(keepalive)
        #: Connections refused, by cause (see :data:`serstream.access.REFUSAL_CAUSES`).
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_CAUSES, 0)
        self._logged_causes: set[str] = set()
        self._closing = False
        self._server: Server | None = None
        self._port: int | None = None
        self.event_clients = 0
        self.ingest_clients = 0
        #: Messages that /events clients sent (they are ignored).
        self.ignored_messages = 0
        self.http_requests = 0
        #: /events clients refused for a ``?since=`` that is not an id.
        self.refused_since = 0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def refusal_counters(self) -> dict[str, int]:
        """Refusals as ``stats.drops`` entries (``refused_<cause>``); a stats provider of the monitor."""
        return {f"refused_{cause}": n for cause, n in self.refusals.items()}

    def _refuse(self, cause: str, peer: str) -> None:
        """Count a refusal; log the first of each cause (later ones are only counted)."""
        self.refusals[cause] = self.refusals.get(cause, 0) + 1
        if cause not in self._logged_causes:
            self._logged_causes.add(cause)
            log.warning("refused a connection from %s: %s (further refusals of this kind are counted "
                        "in stats, not logged)", peer, cause.replace("_", " "))

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``); the requested one before start."""
        return self._port if self._port is not None else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of ``tls_cert``/``tls_key``; ServerError (one line) when they do not load."""
        if self.tls_cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        except FileNotFoundError as exc:
            raise ServerError(f"cannot read TLS file {exc.filename or self.tls_cert}: no such file") from None
        except PermissionError as exc:
            raise ServerError(f"cannot read TLS file {exc.filename or self.tls_cert}: permission denied") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            detail = re.sub(r"\s*\(_ssl\.c:\d+\)", "", " ".join(str(exc).split())) or type(exc).__name__
            raise ServerError(
                f"cannot load the TLS certificate {self.tls_cert} with key {self.tls_key or self.tls_cert}: "
                f"not a PEM certificate and its matching private key ({detail})"
            ) from None
        return context

    def _connection_class(self) -> type[ServerConnection]:
        """ServerConnection that caps pending handshakes per address and counts handshake timeouts."""
        monitor = self

        class _Connection(ServerConnection):
            async def handshake(self, *args: Any, **kwargs: Any) -> None:
                peer = _address(self)
                cause = monitor.limits.acquire("handshake", peer)
                if cause is not None:
                    monitor._refuse(cause, peer)
                    self.transport.abort()
                    raise ConnectionAbortedError(cause)
                try:
                    await super().handshake(*args, **kwargs)
                except asyncio.CancelledError:
                    # serve() cancels the handshake when open_timeout expires.
                    if not monitor._closing:
                        monitor._refuse("handshake_timeout", peer)
                    raise
                finally:
                    monitor.limits.release("handshake", peer)

        return _Connection

    async def start(self) -> None:
        """Bind and start serving. Raises :class:`ServerError` with a one-line reason."""
        if self._server is not None:
            raise ServerError("server already started")
        context = self._ssl_context()
        self._closing = False
        try:
            self._server = await serve(
                self._handle_connection,
                self.host,
                self.requested_port,
                process_request=self._process_request,
                select_subprotocol=self._select_subprotocol,
                create_connection=self._connection_class(),
                max_size=self.max_message_bytes,
                # Off: every client gets the same serialised bytes (compressing per connection
                # costs CPU), and a compressed message could inflate far past max_size in memory
                # before the limit applies (a "compression bomb"). Without the extension it cannot.
                compression=None,
                close_timeout=self.close_timeout,
                # A client that connects and never finishes the handshake is dropped after this
                # (and counted); with TLS it also bounds the TLS handshake.
                open_timeout=self.open_timeout,
                # Keepalive: a ping every `keepalive` s; no pong within as long closes the connection.
                ping_interval=self.keepalive,
                ping_timeout=self.keepalive,
                ssl=context,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {self.requested_port} on {self.host} is already in use; "
                    "pick another with --port"
                ) from None
            reason = exc.strerror or str(exc)
            raise ServerError(f"cannot listen on {self.host}:{self.requested_port}: {reason}") from None
        sockets = list(self._server.sockets)
        self._port = sockets[0].getsockname()[1] if sockets else self.requested_port

    async def close(self) -> None:
        """Stop accepting, close every connection (1001), and wait for the handlers."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> MonitorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ WebSocket

    async def _handle_connection(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        route = self.routes.get(urlsplit(conn.request.path).path)
        if route is None:  # process_request answers every other path; this is a safety net
            await conn.close(1008, "unknown endpoint")
            return
        peer = _address(conn)
        # process_request checked the caps already; this takes the slot (two handshakes may
        # have passed that check at once).
        cause = self.limits.acquire(route.limit, peer)
        if cause is not None:
            self._refuse(cause, peer)
            await conn.close(1013, cause.replace("_", " "))
            return
        try:
            await route.serve(conn)
        finally:
            self.limits.release(route.limit, peer)

    def _select_subprotocol(self, conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """``serstream`` when offered (browsers that send their token this way), else the route's own."""
        if SUBPROTOCOL in offered:
            return Subprotocol(SUBPROTOCOL)
        route = self.routes.get(urlsplit(conn.request.path).path) if conn.request is not None else None
        for name in route.subprotocols if route is not None else ():
            if name in offered:
                return Subprotocol(name)
        return None

    async def _serve_events_route(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        stream = parse_qs(urlsplit(conn.request.path).query).get("stream", [""])[0]
        await self._serve_events(conn, stream or None)

    def _audio_route(self, path: str, handler: IngestHandler) -> Callable[[ServerConnection], Awaitable[None]]:
        """Serve ``path`` with ``handler`` as an audio-in connection (counted with the ingest clients)."""

        async def serve_audio(conn: ServerConnection) -> None:
            assert conn.request is not None
            self.ingest_clients += 1
            try:
                await handler(conn, conn.request)
            except ConnectionClosed:
                pass
            except Exception as exc:  # one call's failure must not reach the others
                log.error("%s handler failed: %s: %s", path, type(exc).__name__, exc)
                await conn.close(1011, "internal error")
            finally:
                self.ingest_clients -= 1

        return serve_audio

    async def _serve_events(self, conn: ServerConnection, stream: str | None) -> None:
        assert conn.request is not None
        raw_since = parse_qs(urlsplit(conn.request.path).query, keep_blank_values=True).get("since")
        since: int | None = None
        if raw_since is not None:
            try:
                since = parse_since(raw_since[0])
            except ValueError as exc:
                self.refused_since += 1
                if self.refused_since == 1:
                    log.warning("refused an /events client: %s (further refusals only counted)", exc)
                await conn.close(1008, f"bad since: {exc}"[:120])
                return
        sub = self.bus.subscribe(stream, self.client_buffer, since=since)
        self.event_clients += 1
        # Reading keeps pings and the close handshake flowing, enforces max_size
        # (1009) and tells us the client left while no event is coming.
        reader = asyncio.create_task(self._discard_incoming(conn))
        reader.add_done_callback(lambda _task: sub.close())
        try:
            await send_events(conn, sub)
        finally:
            self.event_clients -= 1
            sub.close()
            reader.cancel()

    async def _discard_incoming(self, conn: ServerConnection) -> None:
        try:
            async for _message in conn:
                self.ignored_messages += 1
        except ConnectionClosed:
            pass

    async def _serve_ingest(self, conn: ServerConnection) -> None:
        if self.ingest_handler is None:
            await conn.close(1008, "ingest not enabled")
            return
        assert conn.request is not None
        self.ingest_clients += 1
        try:
            await self.ingest_handler(conn, conn.request)
        except ConnectionClosed:
            pass
        except Exception as exc:  # one client's failure must not reach the others
            log.error("ingest handler failed: %s: %s", type(exc).__name__, exc)
            await conn.close(1011, "internal error")
        finally:
            self.ingest_clients -= 1

    # ------------------------------------------------------------ plain HTTP

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        path = parts.path
        if request.method != "GET":
            self.http_requests += 1
            response = _response(405, "text/plain; charset=utf-8", b"method not allowed\n")
            response.headers["Allow"] = "GET"
            return response
        if path == "/healthz":  # open: liveness only, nothing about streams
            self.http_requests += 1
            return self._json_route(self._health)
        peer = _address(conn)
        origins = request.headers.get_all("Origin")
        hosts = request.headers.get_all("Host")
        if origins and (len(origins) != 1 or not origin_allowed(
            origins[0], host_header=hosts[0] if len(hosts) == 1 else None, bind_host=self.host,
            allowlist=self.allow_origins,
        )):
            self._refuse("forbidden_origin", peer)
            return _error_response(403, "forbidden: this origin may not use the monitor "
                                        "(see --allow-origin in docs/security.md)")
        refusal = self._check_token(path, request, peer)
        if refusal is not None:
            return refusal
        route = self.routes.get(path)
        if route is not None:
            cause = self.limits.check(route.limit, peer)
            if cause is not None:
                self._refuse(cause, peer)
                response = _error_response(503, f"busy: {cause.replace('_', ' ')}; try again later")
                response.headers["Retry-After"] = "5"
                return response
            return None  # the WebSocket handshake goes on (426 when it is not one)
        self.http_requests += 1
        if path == "/auth":
            return self._auth_response()
        if path == "/metrics":
            try:
                text = self.metrics()
            except Exception as exc:
                return _error_response(500, f"metrics failed: {type(exc).__name__}")
            return _response(200, PROMETHEUS_CONTENT_TYPE, text.encode("utf-8"))
        return self._static(path)

    def _health(self) -> Mapping[str, Any]:
        full = self.health()
        return {key: full[key] for key in HEALTH_FIELDS if key in full}

    def _check_token(self, path: str, request: Request, peer: str) -> Response | None:
        """None when the request may go on; else the 401 answer (counted as ``unauthorized``)."""
        if self.token is None:
            return None
        creds = _credentials(request, self.port)
        route = self.routes.get(path)
        if route is not None and route.query_token:
            # Twilio and FreeSWITCH connect to a URL and cannot set headers: ?token= (docs/telephony.md).
            given = parse_qs(urlsplit(request.path).query).get("token")
            if given is not None and not creds.presented:
                creds = Credentials(bearer=given[0] if len(given) == 1 else "")
        if route is not None and route.hello_token and not creds.presented:
            return None  # the ingest handler wants the token in the hello instead (docs/ingest.md)
        if credentials_ok(self.token, creds):
            return None
        self._refuse("unauthorized", peer)
        if route is None and path not in ("/metrics", "/auth") and _wants_html(path):
            response = _response(401, "text/html; charset=utf-8", TOKEN_PAGE)
        else:
            response = _error_response(401, "unauthorized: this monitor needs its token "
                                            "(Authorization: Bearer <token>; see docs/security.md)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="serstream"'
        return response

    def _auth_response(self) -> Response:
        """``GET /auth`` with the right bearer token (checked before): the dashboard's cookie."""
        if self.token is None:
            return _response(204, "text/plain; charset=utf-8", b"")
        cookie = (f"{cookie_name(self.port)}={dashboard_cookie_value(self.token)}; Path=/; HttpOnly; SameSite=Strict"
                  + ("; Secure" if self.tls else ""))
        response = _response(204, "text/plain; charset=utf-8", b"")
        response.headers["Set-Cookie"] = cookie
        return response

    def _json_route(self, producer: Callable[[], Mapping[str, Any]]) -> Response:
        try:
            body = json.dumps(producer(), separators=(",", ":"), allow_nan=False).encode("utf-8")
        except Exception as exc:
            return _error_response(500, f"health check failed: {type(exc).__name__}")
        return _response(200, "application/json", body)

    def _static(self, url_path: str) -> Response:
        root = self.dashboard_dir
        if root is None:
            return _error_response(404, "not found")
        relative = unquote(url_path).lstrip("/") or "index.html"
        parts = PurePosixPath(relative).parts
        if (
            "\\" in relative
            or "\x00" in relative
            or any(part in ("..", ".") for part in parts)
            or PurePosixPath(relative).is_absolute()
        ):
            return _error_response(403, "forbidden")
        if any(part.startswith(".") for part in parts):
            return _error_response(404, "not found")
        target = (root / relative).resolve()
        if not target.is_relative_to(root):  # e.g. a symlink pointing outside
            return _error_response(403, "forbidden")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            return _error_response(404, "not found")
        try:
            body = target.read_bytes()
        except OSError:
            return _error_response(404, "not found")
        return _response(200, _content_type(target), body)


def _address(conn: ServerConnection) -> str:
    """The remote IP address of ``conn`` (the port left out: caps count per address)."""
    try:
        addr = conn.remote_address
    except Exception:  # noqa: BLE001 - the transport may already be gone
        return "unknown"
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return str(addr)


def _offered_subprotocols(request: Request) -> list[str]:
    return [p.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")]


def _credentials(request: Request, port: int) -> Credentials:
    return Credentials(
        # Two Authorization headers: ambiguous, so presented but wrong ("").
        bearer=bearer_from_header(auth[0]) if len(auth := request.headers.get_all("Authorization")) == 1
        else ("" if auth else None),
        subprotocol=token_from_subprotocols(_offered_subprotocols(request)),
        cookie=cookie_from_header("; ".join(request.headers.get_all("Cookie")), cookie_name(port)),
    )


def _wants_html(path: str) -> bool:
    name = PurePosixPath(path).name
    return path.endswith("/") or name == "" or name.endswith((".html", ".htm")) or "." not in name


#: What a browser gets for the dashboard without the token: a short explanation, and a script that
#: takes the token from the URL fragment (``/#token=...``, never sent to a server), trades it for the
#: HttpOnly cookie at ``/auth`` and reloads. The fragment stays for the dashboard's own WebSocket.
TOKEN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>serstream: token needed</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>This monitor needs its token</h1>
<p id="why">Open the dashboard with the URL that <code>serstream listen</code> or
<code>serstream serve</code> printed: it ends in <code>#token=...</code>.
The part after <code>#</code> stays in your browser; it is never sent in a request or a referrer.</p>
<script>
function serstreamUnlock() {
  var m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return;
  var token = decodeURIComponent(m[1]);
  fetch("/auth", {headers: {"Authorization": "Bearer " + token}, cache: "no-store", credentials: "same-origin"})
    .then(function (r) {
      if (r.ok) { location.reload(); return; }
      document.getElementById("why").textContent = "The token in this URL is not this monitor's token.";
      document.body.dataset.tokenRefused = "true";
    });
}
serstreamUnlock();
window.addEventListener("hashchange", serstreamUnlock);
</script>
</body></html>
"""


def _content_type(path: Path) -> str:
    if path.suffix in (".js", ".mjs"):
        return "text/javascript; charset=utf-8"
    guessed, _ = mimetypes.guess_type(path.name)
    kind = guessed or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        kind += "; charset=utf-8"
    return kind


def _response(status: int, content_type: str, body: bytes) -> Response:
    reasons = {200: "OK", 204: "No Content", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, reasons.get(status, "Error"), headers, body)


def _error_response(status: int, text: str) -> Response:
    return _response(status, "text/plain; charset=utf-8", (text + "\n").encode("utf-8"))
