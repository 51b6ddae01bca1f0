"""The ``serstream`` command: listen, devices, analyze, serve, cluster, bench.

Every error a user can cause (a missing or broken model, a missing file, a
taken port, a device that does not exist) ends the command with exit code 2
and one line on stderr starting with ``serstream: error:``; no traceback.
Human output (where to connect, the live status per stream) goes to stderr;
stdout carries only data (``--json`` events, ``analyze`` JSON lines,
``devices`` and ``bench`` tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence, TextIO

from serstream_client.model import EmotionEvent, ErrorEvent, EventError, SpeechEvent, StreamEvent, parse_event

from serstream import __version__, events
from serstream.contract import ContractError
from serstream.errors import UserError, one_line

if TYPE_CHECKING:
    from serstream.monitor import Monitor
    from serstream.sources.base import Source

__all__ = ["main", "build_parser", "UserError", "ConsoleOutput", "load_model"]

PROG = "serstream"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="ONNX model (default: $SERSTREAM_MODEL, "
                        "else the shipped model, serstream/data/serstream-default.onnx)")
    parser.add_argument("--device-backend", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where ONNX Runtime runs the model (default: auto = CUDA when usable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads (default: half the cores for the live "
                        "commands, which leave the rest to the audio pipeline; all cores for analyze)")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vad-aggressiveness", type=int, choices=(0, 1, 2, 3), default=2,
                        help="webrtcvad aggressiveness, 0 (keeps most) to 3 (default 2)")
    parser.add_argument("--hop", type=float, default=0.5, metavar="SECONDS",
                        help="a partial estimate every SECONDS of speech (default 0.5)")


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port for WebSocket and HTTP (default 8765)")


def _add_access_args(parser: argparse.ArgumentParser) -> None:
    """Who may connect, TLS and connection limits (``--token`` itself is an ingest option); docs/security.md."""
    from serstream.access import LimitsConfig

    lim = LimitsConfig()
    parser.add_argument("--token-file", metavar="PATH", default=None,
                        help="read the token from PATH (first line), so it is not in the process list")
    parser.add_argument("--no-auth", action="store_true",
                        help="no token even off loopback (anyone who reaches the port reads every reading)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept browser connections from ORIGIN, e.g. https://app.example "
                        "(repeatable; 'null' allows pages opened from files)")
    parser.add_argument("--tls-cert", metavar="PEM", default=None,
                        help="serve https:// and wss:// with this certificate (chain) file")
    parser.add_argument("--tls-key", metavar="PEM", default=None,
                        help="the certificate's private key (default: in the --tls-cert file)")
    parser.add_argument("--max-subscribers", type=_positive_int, default=lim.max_subscribers, metavar="N",
                        help=f"concurrent /events clients (default {lim.max_subscribers})")
    parser.add_argument("--max-subscribers-per-address", type=_positive_int,
                        default=lim.max_subscribers_per_address, metavar="N",
                        help=f"concurrent /events clients from one address (default {lim.max_subscribers_per_address})")
    parser.add_argument("--max-ingest-clients", type=_positive_int, default=lim.max_ingest, metavar="N",
                        help=f"concurrent /ingest connections (default {lim.max_ingest})")
    parser.add_argument("--max-ingest-per-address", type=_positive_int, default=lim.max_ingest_per_address,
                        metavar="N", help=f"concurrent /ingest connections from one address "
                        f"(default {lim.max_ingest_per_address})")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="drop a connection that has not finished its opening handshake by then (default 10)")
    parser.add_argument("--keepalive", type=float, default=20.0, metavar="SECONDS",
                        help="ping every SECONDS and drop a client that does not answer within as long "
                        "(default 20; 0: off)")


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline(4097).strip()
    except FileNotFoundError:
        raise UserError(f"--token-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not first:
        raise UserError(f"--token-file {path} is empty; put the token on its first line")
    return first


def _access_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(TokenDecision, LimitsConfig) from the options; UserError (one line) on a bad combination."""
    import secrets

    from serstream.access import LimitsConfig, decide_token, normalise_origin
    from serstream.sources.ingest import TOKEN_ENV

    for origin in args.allow_origin:
        if origin.strip().lower() != "null" and normalise_origin(origin) is None:
            raise UserError(f"--allow-origin {origin!r} is not an origin; expected scheme://host[:port], "
                            "e.g. https://app.example, or null")
    if (args.tls_key is not None) and args.tls_cert is None:
        raise UserError("--tls-key needs --tls-cert")
    if not args.handshake_timeout > 0:
        raise UserError(f"--handshake-timeout must be > 0, got {args.handshake_timeout}")
    if args.keepalive < 0:
        raise UserError(f"--keepalive must be >= 0, got {args.keepalive}")
    try:
        decision = decide_token(
            args.host,
            flag_token=args.token or None,
            file_token=_read_token_file(args.token_file) if args.token_file else None,
            env_token=os.environ.get(TOKEN_ENV, "").strip() or None,
            no_auth=bool(args.no_auth),
            generate=lambda: secrets.token_urlsafe(24),
        )
        limits = LimitsConfig(
            max_subscribers=args.max_subscribers, max_subscribers_per_address=args.max_subscribers_per_address,
            max_ingest=args.max_ingest_clients, max_ingest_per_address=args.max_ingest_per_address,
        )
    except ValueError as exc:
        raise UserError(one_line(exc, limit=None)) from None
    return decision, limits


def _add_ingest_options(parser: argparse.ArgumentParser) -> None:
    """Options of the /ingest endpoint and the telephony paths (defined beside their code)."""
    from serstream.sources.ingest import add_ingest_arguments
    from serstream.sources.twilio import add_twilio_arguments

    add_ingest_arguments(parser)
    add_twilio_arguments(parser)


def _add_rtp_options(parser: argparse.ArgumentParser) -> None:
    """The RTP source's options (``listen`` only); read by :func:`_rtp_sources`."""
    from serstream.sources.rtp import RtpSourceConfig

    parser.add_argument("--rtp", action="append", default=[], metavar="HOST:PORT",
                        help="receive RTP audio on HOST:PORT, RTCP on PORT+1 (repeatable)")
    parser.add_argument("--rtp-map", action="append", default=[], metavar="PT=ENC/RATE/CH",
                        help="dynamic RTP payload type, as SDP gives it (e.g. 96=L16/16000/1)")
    parser.add_argument("--rtp-idle-timeout", type=float, default=RtpSourceConfig.idle_timeout_s, metavar="SECONDS",
                        help="close an RTP stream after SECONDS without packets (default 5)")
    parser.add_argument("--rtp-max-streams", type=int, default=RtpSourceConfig.max_streams, metavar="N",
                        help="concurrent SSRCs per RTP port; more are refused and counted (default 512)")
    parser.add_argument("--rtp-max-speed", type=float, default=RtpSourceConfig.max_speed, metavar="X",
                        help="drop an SSRC's packets beyond X times real time after a 5 s burst, "
                        "counted as 'flood' (default 2; 0 = no cap)")
    parser.add_argument("--no-rtcp", dest="rtcp", action="store_false", default=True,
                        help="do not bind PORT+1 for RTCP")


def _add_audiosocket_options(parser: argparse.ArgumentParser) -> None:
    """Asterisk AudioSocket listeners (``listen`` and ``serve``; defined beside their code)."""
    from serstream.sources.audiosocket import add_audiosocket_arguments

    add_audiosocket_arguments(parser)


def _workers_count(text: str) -> int:
    """argparse type of ``--workers``: a positive integer or ``auto`` (one per core)."""
    from serstream.workers.plan import parse_workers

    try:
        return parse_workers(text, os.cpu_count())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--workers ")) from None


def _add_workers_option(parser: argparse.ArgumentParser) -> None:
    """``--workers N|auto`` (``listen`` and ``serve``): the per-stream pipelines in N processes."""
    parser.add_argument("--workers", type=_workers_count, default=1, metavar="N|auto",
                        help="run the streams' pipelines in N processes (auto: one per core), one model "
                        "and one port for all; default 1: everything in this process (docs/scale-out.md)")


def _add_history_args(parser: argparse.ArgumentParser) -> None:
    """Event history for reconnecting clients and the SQLite recording (``listen`` and ``serve``)."""
    from serstream.core.history import DEFAULT_HISTORY_S

    parser.add_argument("--history-s", type=_non_negative_float, default=DEFAULT_HISTORY_S, metavar="SECONDS",
                        help="keep events this long for clients that reconnect with /events?since=ID "
                        f"(default {DEFAULT_HISTORY_S:g}; 0 keeps none)")
    parser.add_argument("--record", metavar="PATH",
                        help="append every event to this SQLite database (created if missing; no audio); "
                        "read it with `serstream history PATH`")


def _add_split_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--split-channels`` and ``--roles`` (two-party calls, serstream/core/parties.py)."""
    parser.add_argument("--split-channels", action="store_true", help=f"{what}; mono files are unaffected")
    parser.add_argument("--roles", default=None, metavar="A,B",
                        help="with --split-channels: the parties' roles, one per channel "
                             "(default left,right; e.g. caller,callee)")


def _check_split_args(args: argparse.Namespace) -> None:
    from serstream.core.parties import parse_roles

    if args.roles is None:
        return
    if not args.split_channels:
        raise UserError("--roles needs --split-channels")
    names = [part.strip() for part in str(args.roles).split(",")]
    try:
        parse_roles(names, len(names))
    except ValueError as exc:
        raise UserError(f"--roles: {exc}") from None


def _say_unsplit(names: Sequence[str], quiet: bool = False) -> None:
    """Once for all the mono files of a --split-channels run."""
    if names:
        _info(f"--split-channels: not split (one channel): {', '.join(names)}", quiet)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog=PROG, description="Real-time speech emotion monitor.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    listen = sub.add_parser("listen", help="monitor live audio (microphone, files, RTP) and serve events")
    listen.add_argument("--device", metavar="DEV", help="input device index or name (default: the default input)")
    listen.add_argument("--file", action="append", default=[], metavar="PATH",
                        help="replay an audio file (WAV, FLAC, M4A, Opus, MP3 ...) or every audio file under a "
                        "folder in real time instead of a device (repeatable)")
    listen.add_argument("--fast", action="store_true", help="replay files as fast as possible (no audio dropped)")
    listen.add_argument("--loop", action="store_true", help="replay files in a loop")
    _add_split_args(listen, "a stereo --file is a call: one stream per channel (file:NAME:left, file:NAME:right)")
    listen.add_argument("--exit-when-done", action="store_true",
                        help="exit once every file has been replayed and its estimates sent")
    listen.add_argument("--wait-for-client", action="store_true",
                        help="start the sources only once a client is connected to /events")
    listen.add_argument("--sample-rate", type=_positive_int, default=None, metavar="HZ",
                        help="capture rate for the device (default: the device's default rate)")
    listen.add_argument("--channels", type=_positive_int, default=1, help="channels to capture (mixed to mono)")
    listen.add_argument("--json", action="store_true", help="write every event as a JSON line on stdout")
    listen.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    listen.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after SECONDS")
    _add_server_options(listen)
    _add_access_args(listen)
    _add_model_options(listen)
    _add_pipeline_options(listen)
    _add_ingest_options(listen)
    _add_rtp_options(listen)
    _add_audiosocket_options(listen)
    _add_history_args(listen)
    _add_workers_option(listen)
    _add_cluster_parser(sub, listen)

    sub.add_parser("devices", help="list audio input devices")

    analyze = sub.add_parser("analyze", help="analyse files offline, JSON lines out")
    analyze.add_argument("files", nargs="*", metavar="FILE",
                         help="audio files (WAV, FLAC, M4A, Opus, MP3 ...), each its own stream; a folder: "
                         "every audio file under it, sorted")
    analyze.add_argument("--csv", metavar="LIST.csv",
                         help="CSV with columns file,stream: files of one stream are analysed in order "
                         "as one speaker (state carries over)")
    analyze.add_argument("--output", "-o", metavar="OUT.jsonl", help="write JSON lines here (default stdout)")
    analyze.add_argument("--partials", action="store_true", help="also write partial estimates")
    analyze.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a TTY")
    analyze.add_argument("--batch", type=int, default=32, help="windows per inference batch (default 32)")
    _add_split_args(analyze, "a stereo file is a call: one stream per channel (FILE:left, FILE:right)")
    _add_model_options(analyze)
    _add_pipeline_options(analyze)

    serve = sub.add_parser("serve", help="serve events and network ingest, no local sources")
    serve.add_argument("--json", action="store_true", help="write every event as a JSON line on stdout")
    serve.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    serve.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop after SECONDS")
    _add_server_options(serve)
    _add_access_args(serve)
    _add_model_options(serve)
    _add_pipeline_options(serve)
    _add_ingest_options(serve)
    _add_audiosocket_options(serve)
    _add_history_args(serve)
    _add_workers_option(serve)

    from serstream.watch import add_watch_arguments

    add_watch_arguments(sub.add_parser("watch", help="print a monitor's events live"))
    from serstream.history_cli import add_history_arguments

    add_history_arguments(
        sub.add_parser("history", help="print a --record database's streams or one stream's timeline"))
    bench = sub.add_parser("bench", help="measure inference speed, latency, capacity and memory")
    bench.add_argument("--quick", action="store_true", help="small settings: a smoke test in about a minute")
    bench.add_argument("--max-streams", type=int, default=None, metavar="N",
                       help="highest stream count of the capacity ramp")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    _add_model_options(bench)
    return parser


def _add_cluster_parser(sub: Any, listen: argparse.ArgumentParser) -> None:
    """``serstream cluster``: every ``listen`` option (copied, so the two cannot drift) plus the cluster ones."""
    from serstream.cluster.command import add_cluster_arguments

    cluster = sub.add_parser("cluster", parents=[listen], conflict_handler="resolve",
                             help="listen/serve with the inference on a Ray cluster (docs/scale-out.md)")
    add_cluster_arguments(cluster)


# --------------------------------------------------------------------------- helpers


def load_model(path: str | None, device: str = "auto", threads: int | None = None) -> Any:
    """Resolve and load the model; UserError with one line on any problem."""
    from serstream.inference.session import DeviceError, EmotionModel
    from serstream.models import ModelNotFoundError, resolve_model_path

    try:
        resolved = resolve_model_path(path)
        return EmotionModel.load(resolved, device=device, threads=threads)
    except (ModelNotFoundError, ContractError, DeviceError) as exc:
        raise UserError(one_line(exc, limit=None)) from None


def _live_threads(requested: int | None) -> int:
    """Inference threads for the live commands: the pipeline and its audio threads need a core.

    ONNX Runtime's pool threads spin while waiting, so giving it every core
    takes CPU from the pipeline thread exactly when many streams need it.
    """
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be >= 1, got {requested}")
        return requested
    return max(1, (os.cpu_count() or 2) // 2)



def _monitor_config(args: argparse.Namespace, track_levels: bool) -> Any:
    from serstream.core.vad import VadConfig
    from serstream.monitor import MonitorConfig

    if not args.hop > 0:
        raise UserError(f"--hop must be > 0, got {args.hop}")
    return MonitorConfig(vad=VadConfig(aggressiveness=args.vad_aggressiveness), hop_s=args.hop,
                         track_levels=track_levels)


def _info(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- console output


def _meter(level: float | None, width: int = 8) -> str:
    """A small level meter: -60 dBFS empty, 0 dBFS full."""
    if level is None or level <= 0:
        return "[" + " " * width + "]"
    import math

    db = 20 * math.log10(max(level, 1e-9))
    filled = int(round(max(0.0, min(1.0, (db + 60) / 60)) * width))
    return "[" + "#" * filled + " " * (width - filled) + "]"


class ConsoleOutput:
    """Events to the terminal on a thread of its own, so a slow terminal never stalls the monitor.

    ``--json`` lines go to ``out``; the human status goes to ``err``: one line
    per stream redrawn in place on a TTY, plain lines otherwise. The queue is
    bounded; what does not fit is dropped oldest-first and counted.
    """

    def __init__(
        self,
        json_lines: bool,
        quiet: bool,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        levels: Callable[[], dict[str, float]] | None = None,
        max_queue: int = 10000,
    ) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self.out = out
        self.err = err
        self.live = (not quiet) and (not json_lines) and bool(getattr(err, "isatty", lambda: False)())
        self.levels = levels
        self.max_queue = max_queue
        self.dropped = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._status: dict[str, str] = {}
        self._drawn = 0
        self._thread = threading.Thread(target=self._run, name="serstream-console", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, event: dict[str, Any]) -> None:
        """Queue an event (from any thread); never blocks."""
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    def close(self) -> None:
        """Write what is queued and stop the thread (nothing is written if it never started)."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last_draw = 0.0
        while True:
            self._wake.wait(0.1)
            self._wake.clear()
            while self._queue:
                self._write(self._queue.popleft())
            if self.json_lines:
                with contextlib.suppress(OSError, ValueError):
                    self.out.flush()
            now = time.monotonic()
            if self.live and now - last_draw >= 0.1:
                last_draw = now
                self._draw()
            if self._stop and not self._queue:
                if self.live and self._drawn:
                    self._safe_write(self.err, "\n")
                return

    def _safe_write(self, stream: TextIO, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def _write(self, event: dict[str, Any]) -> None:
        if self.json_lines:
            with contextlib.suppress(OSError, ValueError):
                self.out.write(events.dumps(event) + "\n")
        if self.quiet:
            return
        # The lines are printed from the typed event model, the one the clients parse with.
        try:
            typed = parse_event(event)
        except EventError:
            return  # the monitor's own events always parse; a stray dict is not worth a line
        stream = typed.stream
        kind = typed.type
        line: str | None = None
        if isinstance(typed, EmotionEvent):
            s = typed.smoothed
            status = (f"{typed.kind:<7} {s.label:<9} {s.confidence:4.2f}  "
                      f"A{s.arousal:+.2f} V{s.valence:+.2f}  t={typed.t1:.1f}s")
            self._status[stream] = status
            line = f"[{stream}] {status}"
        elif isinstance(typed, SpeechEvent):
            line = f"[{stream}] speech {typed.state} at {typed.t:.2f}s"
            if typed.state == "start":
                self._status.setdefault(stream, "speaking")
        elif isinstance(typed, StreamEvent):
            line = (f"[{stream}] stream {typed.state} ({typed.source}, {typed.codec}, "
                    f"{typed.sample_rate} Hz, {typed.channels} ch)")
            if typed.state == "open":
                self._status.setdefault(stream, "waiting for speech")
            if typed.reason:
                line += f": {typed.reason}"
        elif isinstance(typed, ErrorEvent):
            line = f"[{stream}] {typed.code}: {typed.message}"
        if line is None:
            return
        if self.live:
            if kind in ("stream", "error"):
                self._clear_block()
                self._safe_write(self.err, line + "\n")
            if isinstance(typed, StreamEvent) and typed.state == "closed":
                self._status.pop(stream, None)
        else:
            self._safe_write(self.err, line + "\n")

    def _clear_block(self) -> None:
        if self._drawn:
            self._safe_write(self.err, f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self._status:
            return
        levels = self.levels() if self.levels else {}
        lines = [f"{name:<24.24} {_meter(levels.get(name))} {text}" for name, text in self._status.items()]
        prefix = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._safe_write(self.err, prefix + "".join(f"\x1b[2K{ln}\n" for ln in lines) + "\x1b[J")
        self._drawn = len(lines)


# --------------------------------------------------------------------------- listen / serve


def _ingest_handler(monitor: Any, bus: Any, args: argparse.Namespace, token: str | None) -> Any:
    """The /ingest endpoint's handler, from the ingest options and the server's token."""
    from serstream.sources.ingest import ingest_handler_from_args

    try:
        return ingest_handler_from_args(monitor, bus, args, token=token)
    except ValueError as exc:
        raise UserError(one_line(exc, limit=None)) from None


def _telephony_routes(monitor: Any, args: argparse.Namespace, token: str | None) -> dict[str, Any]:
    """The /twilio and /fork handlers: served whenever the server runs (docs/telephony.md)."""
    from serstream.sources.fork import make_fork_handler
    from serstream.sources.twilio import make_twilio_handler, twilio_config_from_args

    return {"/twilio": make_twilio_handler(monitor, twilio_config_from_args(args), token=token),
            "/fork": make_fork_handler(monitor)}


def _rtp_sources(monitor: Monitor, args: argparse.Namespace) -> list[Source]:
    """One bound :class:`RtpSource` per ``--rtp``; UserError (one line) on a bad option, address or port.

    Every port is bound before any starts, so a taken port fails the whole set
    cleanly; the caller starts them.
    """
    if not args.rtp:
        return []
    from serstream.monitor import SourceError
    from serstream.rtp import build_payload_map
    from serstream.sources.rtp import RtpSource, RtpSourceConfig, parse_listen_address

    try:
        payload_map = build_payload_map(args.rtp_map)
    except ValueError as exc:
        raise UserError(one_line(exc, limit=None)) from None
    try:
        config = RtpSourceConfig(
            idle_timeout_s=args.rtp_idle_timeout, max_streams=args.rtp_max_streams, rtcp=args.rtcp,
            max_speed=None if not args.rtp_max_speed else args.rtp_max_speed,
        )
    except ValueError as exc:
        raise UserError(f"bad RTP option: {one_line(exc, limit=None)}") from None
    sources: list[Source] = []
    try:
        for host, port in [parse_listen_address(text) for text in args.rtp]:
            sources.append(RtpSource(monitor, host, port, payload_map, config))
    except SourceError as exc:
        for source in sources:
            source.stop()
        raise UserError(one_line(exc, limit=None)) from None
    return sources


def _audiosocket_sources(monitor: Monitor, args: argparse.Namespace) -> list[Source]:
    """One bound AudioSocket listener per ``--audiosocket``; UserError (one line) on a bad value or port."""
    if not getattr(args, "audiosocket", None):
        return []
    from serstream.monitor import SourceError
    from serstream.sources.audiosocket import audiosocket_sources_from_args

    try:
        return list(audiosocket_sources_from_args(monitor, args))
    except (ValueError, SourceError) as exc:
        raise UserError(one_line(exc, limit=None)) from None


async def _run_server(args: argparse.Namespace, model: Any, with_sources: bool) -> int:
    from serstream.inference.session import describe_device
    from serstream.metrics import scrape
    from serstream.monitor import Monitor, MonitorError
    from serstream.server import EventBus, MonitorServer, ServerError, default_dashboard_dir
    from serstream.sources.file import FileSource
    from serstream.sources.microphone import MicrophoneSource

    loop = asyncio.get_running_loop()
    access, limits = _access_settings(args)
    from serstream.core.history import run_first_id

    # Ids of this run start above every id of an earlier run: a client resuming across a restart is told so.
    bus = EventBus(history_s=getattr(args, "history_s", 60.0), first_id=run_first_id(time.time()))
    quiet = bool(args.quiet)
    console = ConsoleOutput(json_lines=bool(args.json), quiet=quiet)

    def sink(event: dict[str, Any]) -> None:
        bus.publish_threadsafe(loop, event)
        console.offer(event)

    workers = int(getattr(args, "workers", 1) or 1)
    shards = int(getattr(args, "shards", 0) or 0)  # serstream cluster --shards N
    pooled = workers > 1 or shards > 0
    if shards:
        from serstream.cluster.shards import shard_pool

        monitor: Any = shard_pool(model, _monitor_config(args, track_levels=console.live), sink, shards=shards,
                                  app=args.app, num_cpus=args.shard_cpus, request_timeout_s=args.request_timeout,
                                  start_timeout_s=args.deploy_timeout)
    elif workers > 1:
        from serstream.workers.pool import WorkerPool

        monitor = WorkerPool(model, _monitor_config(args, track_levels=console.live), sink, workers=workers)
    else:
        monitor = Monitor(model, _monitor_config(args, track_levels=console.live), sink)
    console.levels = monitor.levels
    monitor.set_bus_drop_counter(lambda: bus.events_dropped + console.dropped)

    # Build the sources first: a bad file or device is reported before anything starts.
    # Ids: file:NAME, then file:NAME-2 ... for the same name again (core/stream_ids.py).
    files: list[FileSource] = []
    mic: MicrophoneSource | None = None
    if with_sources:
        for path in args.file:
            files.append(FileSource(monitor, path, realtime=not args.fast, loop=args.loop,
                                    split=args.split_channels, roles=args.roles))
        _say_unsplit([str(f.path) for f in files if f.split_skipped], quiet)
        # The microphone when asked for, or when nothing else is: `serstream listen` alone listens.
        if args.device is not None or not (files or args.rtp or args.audiosocket):
            mic = MicrophoneSource(monitor, device=_device_arg(args.device), sample_rate=args.sample_rate,
                                   channels=args.channels)

    server = MonitorServer(
        bus, args.host, args.port, health=monitor.health,
        metrics=lambda: scrape(monitor), dashboard_dir=default_dashboard_dir(),
        ingest_handler=_ingest_handler(monitor, bus, args, access.token),
        audio_routes=_telephony_routes(monitor, args, access.token),
        # The ingest's frame limit must fit in a WebSocket message.
        max_message_bytes=max(1 << 20, int(getattr(args, "max_frame_bytes", 0) or 0)),
        token=access.token, allow_origins=args.allow_origin, tls_cert=args.tls_cert, tls_key=args.tls_key,
        limits=limits, open_timeout=args.handshake_timeout, keepalive=args.keepalive,
    )
    monitor.add_stats_provider(server.refusal_counters)
    backend_counters = getattr(model, "counters", None)  # a cluster backend's retries, timeouts...
    if callable(backend_counters):
        monitor.add_stats_provider(backend_counters)
    recorder = _open_recorder(args)
    if recorder is not None:
        bus.add_listener(recorder.offer_entry)
        monitor.add_stats_provider(lambda: {"record_dropped": recorder.dropped})
    monitor.add_stats_provider(lambda: {"events_refused_since": server.refused_since})
    try:
        await server.start()
    except ServerError as exc:
        if recorder is not None:
            recorder.close()
        raise UserError(one_line(exc, limit=None)) from None
    if pooled:
        try:
            await asyncio.to_thread(monitor.start)  # spawns the workers (or shard actors) and waits for them
        except MonitorError as exc:
            await server.close()
            if recorder is not None:
                recorder.close()
            raise UserError(one_line(exc, limit=None)) from None
    else:
        monitor.start()
    stop = asyncio.Event()
    if shards:
        # The Ray cluster gone (a shard that cannot be made again): stop, then exit with its one line.
        monitor.on_fatal(lambda line: loop.call_soon_threadsafe(stop.set))
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    started: list[Source] = []
    try:
        try:
            # Live sources first: a device or port problem is the one line the user sees.
            if mic is not None:
                mic.start()
                started.append(mic)
            if with_sources:
                for rtp in _rtp_sources(monitor, args):
                    rtp.start()
                    started.append(rtp)
            for listener in _audiosocket_sources(monitor, args):
                listener.start()
                started.append(listener)
        except MonitorError as exc:
            raise UserError(one_line(exc, limit=None)) from None
        # Events queued so far (a stream opened) print from here on; on a start-up error
        # above the console never starts, so the error stays the only line.
        console.start()
        _info(f"model {model.info.version} on {describe_device(model)} ({model.path})", quiet)
        if shards:
            from serstream.cluster.shards import placement

            nodes = sorted({str(node)[:8] for node in placement(monitor) if node})
            _info(f"{shards} pipeline shards (Ray actors) run the streams' pipelines on node(s) "
                  f"{', '.join(nodes)}", quiet)
        elif workers > 1:
            _info(f"{workers} worker processes run the streams' pipelines (pids "
                  f"{', '.join(str(pid) for pid in monitor.worker_pids())}); one model in this process", quiet)
        _print_endpoints(args.host, server.port, server.tls, access, quiet)
        if recorder is not None:
            _info(f"recording events to {recorder.path} (run {recorder.run_id}; no audio)", quiet)
        for source in started:
            _info(f"{source.description}; Ctrl-C to stop" if source is mic else source.description, quiet)
        if files and getattr(args, "wait_for_client", False):
            _info("waiting for a client on /events before starting the sources", quiet)
            while bus.subscribers == 0 and not stop.is_set():
                await asyncio.sleep(0.02)
        try:
            for source in files:
                source.start()
                started.append(source)
        except MonitorError as exc:
            raise UserError(one_line(exc, limit=None)) from None
        if not with_sources:
            _info("serving; Ctrl-C to stop", quiet)
        await _wait_until_done(args, stop, files, with_sources)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        for source in started:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(source.stop)
        await asyncio.to_thread(monitor.stop, True)
        # The final estimates are handed to the loop; let it number (and record) them.
        handoff_deadline = time.monotonic() + 2.0
        while bus.pending_handoff and time.monotonic() < handoff_deadline:
            await asyncio.sleep(0.01)
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
            _info(f"recorded {recorder.written} events to {recorder.path} "
                  f"({recorder.dropped} dropped)", quiet)
        # Give connected clients a moment to receive the last events (finals, stream closed).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(s.pending for s in bus.subscriptions()):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        await server.close()
        console.close()
    if shards and monitor.fatal:
        from serstream.errors import ClusterError

        raise ClusterError(monitor.fatal)
    return 0


def _print_endpoints(host: str, port: int, tls: bool, access: Any, quiet: bool) -> None:
    """Where to connect, with the dashboard URL that works (the token in its fragment, never sent)."""
    from urllib.parse import quote

    shown = f"[{host}]" if ":" in host else host
    base = f"{shown}:{port}"
    http, ws = ("https", "wss") if tls else ("http", "ws")
    fragment = f"#token={quote(access.token, safe='')}" if access.token else ""
    if access.warning:
        print(f"{PROG}: {access.warning}", file=sys.stderr, flush=True)
    if access.generated:
        print(f"{PROG}: no token given for {host}: generated one for this run (it is in the dashboard URL "
              "below; programs send it as Authorization: Bearer <token>)", file=sys.stderr, flush=True)
    needs = "   (send Authorization: Bearer <token>)" if access.token else ""
    _info(f"events    {ws}://{base}/events   (one stream: {ws}://{base}/events?stream=ID){needs}", quiet)
    _info(f"calls     {ws}://{base}/twilio (Twilio Media Streams)   {ws}://{base}/fork (FreeSWITCH mod_audio_fork)",
          quiet)
    # With a generated token this line is the only place the token is, so --quiet does not hide it.
    _info(f"dashboard {http}://{base}/{fragment}   health {http}://{base}/healthz   metrics {http}://{base}/metrics",
          quiet and not access.generated)


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a rate or channel count of 0 is a typo, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _open_recorder(args: argparse.Namespace) -> Any:
    """The --record database's writer, or None; UserError with one line when it cannot be used."""
    path = getattr(args, "record", None)
    if not path:
        return None
    from serstream.record import Recorder, RecordError

    try:
        return Recorder(path, command=" ".join(["serstream", args.command]), version=__version__)
    except RecordError as exc:
        raise UserError(one_line(exc, limit=None)) from None


def _device_arg(device: str | None) -> int | str | None:
    if device is None:
        return None
    return int(device) if device.strip().isdigit() else device


async def _wait_until_done(
    args: argparse.Namespace, stop: asyncio.Event, files: Sequence[Any], with_sources: bool
) -> None:
    deadline = None if args.duration is None else time.monotonic() + max(0.0, args.duration)
    exit_when_done = with_sources and getattr(args, "exit_when_done", False) and files
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            return
        if exit_when_done and all(f.done.is_set() for f in files):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.05)


def _expand_files(paths: Sequence[str]) -> list[str]:
    """FILE arguments with each folder replaced by the audio files under it (serstream/audiofile.py)."""
    from serstream.audiofile import SourceError, expand_audio_paths

    try:
        return [str(path) for path in expand_audio_paths(paths)]
    except SourceError as exc:
        raise UserError(one_line(exc, limit=None)) from None


def _cmd_listen(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration < 0:
        raise UserError("--duration must be >= 0")
    args.file = _expand_files(args.file)
    if args.exit_when_done and not args.file:
        raise UserError("--exit-when-done needs at least one --file")
    _check_split_args(args)
    model = load_model(args.model, args.device_backend, _live_threads(args.threads))
    return asyncio.run(_run_server(args, model, with_sources=True))


def _cmd_cluster(args: argparse.Namespace) -> int:
    from serstream.cluster.command import run_cluster
    from serstream.cluster.connect import parse_address
    from serstream.cluster.keeper import needs_keeper, run_kept

    try:
        kind = parse_address(args.address)[0]
    except ValueError:
        kind = "invalid"  # run_cluster says why, in one line
    if needs_keeper(kind):
        # A driver can be ended by Ray itself, silently: a keeper process says why (cluster/keeper.py).
        return run_kept(args.raw_argv, args.address)

    def run_monitor(ns: argparse.Namespace, backend: Any, with_sources: bool) -> int:
        return asyncio.run(_run_server(ns, backend, with_sources=with_sources))

    return run_cluster(args, load_model, run_monitor)


def _cmd_serve(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.device_backend, _live_threads(args.threads))
    return asyncio.run(_run_server(args, model, with_sources=False))


# --------------------------------------------------------------------------- devices


def _cmd_devices(args: argparse.Namespace) -> int:
    from serstream.monitor import MonitorError
    from serstream.sources.microphone import list_input_devices, resolve_input_device

    try:
        devices = list_input_devices()
        if not devices:
            resolve_input_device(None, devices)  # raises the "no input device" error
        default = resolve_input_device(None, devices).index
    except MonitorError as exc:
        raise UserError(one_line(exc, limit=None)) from None
    width = max(len(d.name) for d in devices)
    print(f"   {'index':>5}  {'name':<{width}}  {'host API':<10}  {'channels':>8}  {'default rate':>12}")
    for d in devices:
        mark = "*" if d.index == default else " "
        print(f" {mark} {d.index:>5}  {d.name:<{width}}  {d.hostapi:<10}  {d.max_input_channels:>8}  "
              f"{d.default_samplerate:>9.0f} Hz")
    return 0


# --------------------------------------------------------------------------- analyze


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()

    def step(self, path: Path, error: str | None) -> None:
        self.done += 1
        self.failed += error is not None
        if error is not None:
            print(f"\r\x1b[2K{PROG}: {error}" if self.enabled else f"{PROG}: {error}", file=sys.stderr, flush=True)
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        sys.stderr.write(
            f"\r\x1b[2K[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} files"
            f"  {rate:.1f} files/s  {self.failed} failed"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _cmd_analyze(args: argparse.Namespace) -> int:
    from serstream.analyze import AnalyzeConfig, AnalyzeError, analyze, split_channels, streams_from_args
    from serstream.core.vad import VadConfig

    if not args.files and not args.csv:
        raise UserError("analyze needs FILE arguments or --csv LIST.csv")
    if args.batch < 1:
        raise UserError("--batch must be >= 1")
    if not args.hop > 0:
        raise UserError(f"--hop must be > 0, got {args.hop}")
    _check_split_args(args)
    try:
        streams = streams_from_args(_expand_files(args.files), args.csv)
        if args.split_channels:
            streams, whole = split_channels(streams, args.roles)
            _say_unsplit([str(f) for spec in whole for f in spec.files])
    except (AnalyzeError, ValueError) as exc:
        raise UserError(one_line(exc, limit=None)) from None
    model = load_model(args.model, args.device_backend, args.threads)
    total = sum(len(s.files) for s in streams)
    progress = _Progress(total, enabled=args.progress or (total > 1 and sys.stderr.isatty()))
    try:
        out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as exc:
        raise UserError(f"cannot write {args.output}: {exc.strerror}") from None
    config = AnalyzeConfig(vad=VadConfig(aggressiveness=args.vad_aggressiveness), hop_s=args.hop,
                           partials=args.partials, max_batch=args.batch)
    def write_event(event: dict[str, Any]) -> None:
        out.write(events.dumps(event) + "\n")

    try:
        summary = analyze(model, streams, write_event, config, progress.step)
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    return 1 if summary.failed else 0


# --------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    from serstream import bench

    if args.max_streams is not None and args.max_streams < 1:
        raise UserError("--max-streams must be >= 1")
    model = load_model(args.model, args.device_backend, _live_threads(args.threads))
    return bench.run_cli(model, quick=args.quick, max_streams=args.max_streams, as_json=args.json)


# --------------------------------------------------------------------------- main


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "listen": _cmd_listen,
    "serve": _cmd_serve,
    "cluster": _cmd_cluster,
    "devices": _cmd_devices,
    "analyze": _cmd_analyze,
    "bench": _cmd_bench,
    "watch": lambda args: __import__("serstream.watch", fromlist=["run_watch"]).run_watch(args),
    "history": lambda args: __import__("serstream.history_cli", fromlist=["run_history"]).run_history(args),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``serstream`` console script; returns the exit code."""
    from serstream.monitor import MonitorError

    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except MonitorError as exc:
        print(f"{PROG}: error: {one_line(exc, limit=None)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside the running monitor (e.g. while the model loads): a clean stop.
        return 0
    except BrokenPipeError:
        # stdout closed by the reader (e.g. `| head`); nothing left to say.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0
