"""The ``/twilio`` WebSocket: Twilio Media Streams (and the Telnyx variant) into party streams.

Point a ``<Start><Stream url="wss://HOST/twilio">`` (or ``<Connect><Stream>``)
at the monitor, with ``<Parameter name="token" value="..."/>`` when it has a
token (``<Stream url>`` takes no query string, and Twilio sets no headers we
choose), or run it with ``--twilio-auth-token`` so that every handshake's
``X-Twilio-Signature`` is checked instead; docs/telephony.md has the set-up.
This adapter reads the socket and carries out what the pure
:class:`~serstream.sources.twilio_session.TwilioSession` decides: at
``start`` it opens one stream per track (``twilio:<callSid>:inbound`` and
``...:outbound``, source ``twilio``, the call's ``callSid`` as ``call``, the
track as ``role``, ``customParameters`` as ``params``); each ``media`` chunk
goes to its track's stream at its timestamp's place; ``stop`` closes them
(reason ``stop``). A call that goes quiet for ``idle_timeout_s`` is closed
(reason ``idle timeout``), one whose socket drops is closed ``disconnected``.

Bad input (malformed JSON, a payload that is not base64, ``media`` before
``start``, ...) is dropped and counted by cause, logged once per cause and
reported once per connection as an ``error`` event on the call's streams;
an unknown encoding refuses the call (1003). Nothing is sent back to Twilio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from serstream.sources.telephony import CallHandlerBase, CallState, Reader, peer_of
from serstream.sources.twilio_session import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    OpenTrack,
    Refuse,
    Rejected,
    StartCall,
    Stop,
    TrackAudio,
    TwilioConfig,
    TwilioSession,
    signature_ok,
)

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request

    from serstream.monitor import Monitor, StreamHandle

__all__ = ["TwilioHandler", "make_twilio_handler", "signed_urls", "add_twilio_arguments", "twilio_config_from_args"]

#: Where ``--twilio-auth-token`` is read from when not given (a secret is better kept off the command line).
AUTH_TOKEN_ENV = "TWILIO_AUTH_TOKEN"

CLOSE_TRY_LATER = 1013


class TwilioHandler(CallHandlerBase):
    """The handler of ``/twilio`` (``MonitorServer(..., audio_routes={"/twilio": handler})``).

    ``counters`` (totals since start): ``connections``, ``messages``, ``starts``,
    ``stops``, ``connected``, ``dtmf``, ``mark``, ``chunks``, ``gaps``,
    ``gap_frames`` (silence filled), ``overlap_frames``, ``clock_jumps``,
    ``rejected_<cause>`` (see :data:`~serstream.sources.twilio_session.REJECT_CAUSES`),
    the refusals ``bad_start``, ``unknown_encoding``, ``no_start``, ``refused_busy``,
    and ``idle_timeouts``, ``disconnects``, ``streams_opened``,
    ``backpressure_waits``, ``speed_waits``.
    """

    source = "twilio"
    prefix = "twilio"
    #: The server lets a handshake without credentials through: the start's token decides.
    checks_token = True
    drop_keys = ("refused_signature", "refused_token", "bad_start", "unknown_encoding", "no_start", "refused_busy",
                 "idle_timeouts", "disconnects", "clock_jumps")

    def __init__(self, monitor: Monitor, config: TwilioConfig | None = None, max_calls: int = 256) -> None:
        super().__init__(monitor, max_calls)
        self.config = config or TwilioConfig()

    @property
    def description(self) -> str:
        return "receiving Twilio Media Streams on /twilio"

    async def __call__(self, conn: ServerConnection, request: Request) -> None:
        self._count("connections")
        signed = False
        if self.config.auth_token is not None:
            urls = signed_urls(request, self.config.public_url)
            if not signature_ok(self.config.auth_token, urls, request.headers.get("X-Twilio-Signature")):
                self._count("refused_signature")
                self._log_once("refused_signature", f"refused a stream from {peer_of(conn)}: no valid "
                                                    f"X-Twilio-Signature for {urls[0]}")
                await conn.close(CLOSE_POLICY, "invalid Twilio signature")
                return
            signed = True
        session = TwilioSession(self.config, time.monotonic(), self.counters,
                                authenticated=signed or _handshake_token(request) is not None)
        state = CallState()
        try:
            async with Reader(conn, session) as reader:
                state.reason = await self._serve(conn, session, reader, state)
        except ConnectionClosedError:
            self._count("disconnects")
            state.reason = "disconnected"
        except ConnectionClosed:
            state.reason = "client closed"
        finally:
            self._end_call(state)

    async def _serve(self, conn: ServerConnection, session: TwilioSession, reader: Reader, state: CallState) -> str:
        """Read and carry out until the call ends; the reason its streams close with."""
        handles: dict[str, StreamHandle] = {}
        while True:
            message = await reader.recv()
            if message is None:
                expired = reader.expired
                if isinstance(expired, Refuse):
                    self._log_once(expired.cause, f"refused a stream from {peer_of(conn)}: {expired.reason}")
                return str(expired.reason) if expired is not None else "client closed"
            for decision in session.receive(message, time.monotonic()):
                if isinstance(decision, TrackAudio):
                    handle = handles.get(decision.track)
                    if handle is not None and decision.samples.shape[0]:
                        await self._push(handle, decision.samples, session.pace_delay)
                        session.resume(time.monotonic())
                elif isinstance(decision, Rejected):
                    if decision.report:
                        track_handle = handles.get(decision.track or "")
                        targets = [track_handle] if track_handle else list(handles.values())
                        self._report([h.stream_id for h in targets], decision.cause, decision.message,
                                     decision.count)
                elif isinstance(decision, StartCall):
                    if not self._begin_call(state):
                        await conn.close(CLOSE_TRY_LATER, f"too many calls (max {self.max_calls})")
                        return "too many calls"
                    for track in decision.tracks:
                        if not await self._open_track(conn, decision, track, handles, state):
                            return "monitor busy"
                elif isinstance(decision, OpenTrack):
                    assert session.call is not None
                    if not await self._open_track(conn, session.call, decision.track, handles, state):
                        return "monitor busy"
                elif isinstance(decision, Stop):
                    await conn.close(CLOSE_NORMAL, "stop")
                    return decision.reason
                else:
                    assert isinstance(decision, Refuse)
                    self._log_once(decision.cause, f"refused a stream from {peer_of(conn)}: {decision.reason}")
                    await conn.close(decision.code, decision.reason)
                    return decision.reason
            if any(h.closed for h in handles.values()):
                # The monitor ended a party (failure, shutdown): end the call.
                await conn.close(1011, "stream closed by the monitor")
                return "stream closed by the monitor"

    async def _open_track(
        self, conn: ServerConnection, call: StartCall, track: str, handles: dict[str, StreamHandle], state: CallState
    ) -> bool:
        opened = self._open_party(
            conn, call.stream_id(track), codec=call.codec.stream_codec, sample_rate=call.sample_rate,
            call=call.call, role=track, params=call.params or None,
        )
        if isinstance(opened, str):
            self._count("refused_busy")
            self._log_once("refused_busy", f"could not open a stream for call {call.call}: {opened}")
            await conn.close(CLOSE_TRY_LATER, opened)
            return False
        handles[track] = opened
        state.handles.append(opened)
        return True


def signed_urls(request: Request, public_url: str | None) -> list[str]:
    """The URLs Twilio may have signed: ``public_url`` when configured, else ``wss://<Host><path>``."""
    if public_url:
        return [public_url]
    return [f"wss://{request.headers.get('Host', '')}{request.path}"]


def _handshake_token(request: Request) -> str | None:
    """The token the handshake carried (``Authorization: Bearer`` or ``?token=``); the server checked it."""
    header = request.headers.get("Authorization")
    if header is not None:
        return header
    return parse_qs(urlsplit(request.path).query).get("token", [None])[0]


def make_twilio_handler(
    monitor: Monitor, config: TwilioConfig | None = None, max_calls: int = 256, token: str | None = None
) -> TwilioHandler:
    """The ``/twilio`` handler, its counters registered with the monitor's ``stats.drops``.

    ``token``: the server's token (None: none), checked at ``start`` when the
    handshake carried none (see :class:`~serstream.sources.twilio_session.TwilioConfig`).
    """
    config = config or TwilioConfig()
    if token is not None:
        config = dataclasses.replace(config, token=token)
    handler = TwilioHandler(monitor, config, max_calls)
    add = getattr(monitor, "add_stats_provider", None)
    if add is not None:
        add(handler.drop_counters)
    return handler


def add_twilio_arguments(parser: argparse.ArgumentParser) -> None:
    """``--twilio-auth-token`` and ``--twilio-url`` (the X-Twilio-Signature check of /twilio)."""
    parser.add_argument("--twilio-auth-token", default=None, metavar="TOKEN",
                        help=f"verify X-Twilio-Signature on /twilio with this Twilio auth token "
                             f"(default: ${AUTH_TOKEN_ENV}; unset: no check; docs/telephony.md)")
    parser.add_argument("--twilio-url", default=None, metavar="URL",
                        help="the <Stream url> Twilio signs, when a proxy changes the Host "
                             "(default: wss://<Host header>/twilio)")


def twilio_config_from_args(args: argparse.Namespace) -> TwilioConfig:
    """The /twilio config from ``--twilio-auth-token`` (else ``$TWILIO_AUTH_TOKEN``) and ``--twilio-url``."""
    auth = getattr(args, "twilio_auth_token", None) or os.environ.get(AUTH_TOKEN_ENV, "").strip() or None
    return TwilioConfig(auth_token=auth, public_url=getattr(args, "twilio_url", None) or None)
