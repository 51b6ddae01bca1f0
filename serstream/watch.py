"""``serstream watch ws://HOST:PORT``: a monitor's events, live, in the terminal.

Readable by default: one line per final estimate, speech start and end,
stream open and close, and error; partial estimates are one line redrawn in
place when stdout is a terminal (with ``--partials``, printed as lines
otherwise). ``--json`` prints every event as the JSON line the monitor sent.

The reading is :func:`serstream.client.events`: it reconnects with backoff
when the monitor goes away and logs one line when it does and when it is
back; it reconnects with the last event id it saw (``/events?since=ID``), so
the events of the outage are printed after all, or one ``gap`` line says how
many are gone. A monitor that is not running is said once and retried, or, with
``--no-retry``, ends the command with exit code 2 and one line.

The CLI wires it in with two lines in :mod:`serstream.cli`::

    watch = sub.add_parser("watch", help="print a monitor's events live"); add_watch_arguments(watch)
    _COMMANDS["watch"] = run_watch

It can also run on its own: ``python -m serstream.watch ws://127.0.0.1:8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence, TextIO
from urllib.parse import urlsplit, urlunsplit

from serstream_client.client import AnyEvent, read_event
from serstream_client.model import (
    EmotionEvent,
    ErrorEvent,
    GapEvent,
    SpeechEvent,
    StatsEvent,
    StreamEvent,
    UnknownEvent,
)

from serstream.errors import WatchError
from serstream.events import dumps

__all__ = [
    "add_watch_arguments",
    "run_watch",
    "events_url",
    "WatchOptions",
    "format_event",
    "format_partial",
    "Printer",
    "main",
]

PROG = "serstream"


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``serstream watch``."""
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8765", metavar="ws://HOST:PORT",
                        help="the monitor (default ws://127.0.0.1:8765; /events is added when no path is given)")
    parser.add_argument("--stream", metavar="ID", default=None,
                        help="only this stream's events (stats still come with --stats)")
    parser.add_argument("--call", metavar="ID", default=None,
                        help="only the events of this call's parties (both sides, each line with its role)")
    parser.add_argument("--json", action="store_true", help="print every event as a JSON line")
    parser.add_argument("--partials", action="store_true",
                        help="print partial estimates as lines even when stdout is not a terminal")
    parser.add_argument("--stats", action="store_true", help="also print the monitor's periodic stats")
    parser.add_argument("--no-retry", action="store_true",
                        help="exit (code 2) when the monitor cannot be reached or goes away")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop after SECONDS")
    parser.add_argument("--token", default=None, metavar="SECRET",
                        help="the monitor's token (default: $SERSTREAM_TOKEN, or #token= of a pasted dashboard URL)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="read the token from PATH (first line), so it is not in the process list")
    parser.add_argument("--ca-file", default=None, metavar="PEM",
                        help="verify a wss:// monitor's certificate with this CA (or self-signed certificate) file")
    parser.add_argument("--since", type=int, default=None, metavar="ID",
                        help="start with the events after this event id that the monitor still holds")


def token_from_url(url: str) -> str | None:
    """The token of a dashboard URL's fragment (``http://HOST:PORT/#token=...``), or None."""
    from urllib.parse import parse_qs

    fragment = urlsplit(url.strip()).fragment
    values = parse_qs(fragment).get("token") if fragment else None
    return values[0] if values else None


def resolve_token(args: argparse.Namespace) -> str | None:
    """``--token``, else ``--token-file``, else ``$SERSTREAM_TOKEN``, else the URL's ``#token=``; WatchError."""
    if getattr(args, "token", None):
        return str(args.token)
    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.readline(4097).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise WatchError(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise WatchError(f"--token-file {path} is empty; put the token on its first line")
        return token
    return os.environ.get("SERSTREAM_TOKEN", "").strip() or token_from_url(getattr(args, "url", "") or "")


def events_url(url: str) -> str:
    """``ws://HOST:PORT`` -> ``ws://HOST:PORT/events``; WatchError for what cannot be a monitor URL.

    A pasted dashboard URL works too: ``http(s)`` becomes ``ws(s)`` and the
    fragment (where the dashboard keeps its token) is dropped.
    """
    text = url.strip()
    if "://" not in text:
        text = "ws://" + text  # HOST:PORT alone
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        parts = parts._replace(scheme="ws" if parts.scheme == "http" else "wss")
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WatchError(f"{url!r} is not a monitor URL; expected ws://HOST:PORT")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/events")
    return urlunsplit(parts._replace(fragment=""))


# --------------------------------------------------------------------------- formatting (pure)


@dataclass(frozen=True)
class WatchOptions:
    """What to show."""

    json_lines: bool = False
    partials_as_lines: bool = False
    stats: bool = False


def _clock(ts: Any) -> str:
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    return "--:--:--"


def _f(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return "?"


def _emotion_text(e: EmotionEvent) -> str:
    mood = e.smoothed
    return (f"{e.kind:<7} {e.label:<9} {e.confidence:.2f}  "
            f"A{e.arousal:+.2f} V{e.valence:+.2f} D{e.dominance:+.2f}  "
            f"{e.t0:.1f}-{e.t1:.1f}s  mood {mood.label} {mood.confidence:.2f}  {e.latency_ms:.0f} ms")


def _typed(event: AnyEvent | Mapping[str, Any]) -> AnyEvent:
    """The typed event (a dict from the monitor's bus is parsed, leniently, by the client's reader)."""
    return read_event(event) if isinstance(event, Mapping) else event


def _wire(event: AnyEvent | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object to print with --json: what the monitor sent, when known."""
    if isinstance(event, Mapping):
        return dict(event)
    if event.raw:
        return dict(event.raw)
    return {} if isinstance(event, UnknownEvent) else event.to_dict()


def format_partial(event: AnyEvent | Mapping[str, Any]) -> str:
    """The compact in-place line of a partial estimate."""
    typed = _typed(event)
    if not isinstance(typed, EmotionEvent):
        return ""
    return f"{_head(typed, None)} {_emotion_text(typed)}"


_GAP_REASONS = {"history": "no longer held by the monitor", "overflow": "this client read too slowly",
                "restart": "the monitor restarted", "future": "the monitor does not know that id"}


def _head(e: AnyEvent, roles: Mapping[str, str] | None) -> str:
    """``HH:MM:SS [stream]``, and the party's role for a call's stream (``[file:c.wav:left] left:``)."""
    role = getattr(e, "role", None) or (roles or {}).get(e.stream)
    return f"{_clock(e.ts)} [{e.stream}]" + (f" {role}:" if role else "")


def format_event(
    event: AnyEvent | Mapping[str, Any], options: WatchOptions = WatchOptions(),
    roles: Mapping[str, str] | None = None,
) -> str | None:
    """One readable line for an event, or None for what is not shown (partials, stats, unknown or malformed).

    The line is made from the typed event model (:mod:`serstream_client.model`), the one every
    client parses with; a dict is parsed first, and one that does not parse is not shown.
    ``roles`` (stream -> role) names the party of events that do not carry their role (speech, error).
    """
    e = _typed(event)
    head = _head(e, roles)
    if isinstance(e, EmotionEvent):
        if e.kind != "final" and not options.partials_as_lines:
            return None
        return f"{head} {_emotion_text(e)}"
    if isinstance(e, SpeechEvent):
        if e.state == "end":
            return f"{head} speech end at {e.t:.2f}s ({_f(e.duration, '.2f')} s, {e.reason or '?'})"
        return f"{head} speech {e.state} at {e.t:.2f}s"
    if isinstance(e, StreamEvent):
        line = f"{head} stream {e.state} ({e.source}, {e.codec}, {e.sample_rate} Hz, {e.channels} ch)"
        if e.detail:
            line += f" {e.detail}"
        if e.reason:
            line += f": {e.reason}"
        if e.call:
            line += f" (call {e.call})"
        return line
    if isinstance(e, GapEvent):
        why = _GAP_REASONS.get(e.reason, e.reason)
        return f"{head} gap: {e.lost} events lost after id {e.since} ({why}); resuming at id {e.resume_from}"
    if isinstance(e, ErrorEvent):
        return f"{head} error {e.code}: {e.message} (x{e.count})"
    if isinstance(e, StatsEvent) and options.stats:
        dropped = sum(v for v in e.drops.values() if isinstance(v, (int, float)))
        return (f"{head} stats {e.streams} streams, {e.windows_per_s:.1f} windows/s, "
                f"latency p50 {_f(e.latency_ms.get('p50'), '.0f')} p95 {_f(e.latency_ms.get('p95'), '.0f')} ms, "
                f"batch mean {_f(e.batches.get('mean_size'), '.1f')} max {_f(e.batches.get('max_size'), '.0f')}, "
                f"{dropped} dropped, {e.device}")
    return None


class Printer:
    """Writes events to ``out``: lines, plus one partial line redrawn in place on a terminal."""

    def __init__(self, out: TextIO, options: WatchOptions, tty: bool) -> None:
        self.out = out
        self.options = options
        self.tty = tty
        self.lines = 0
        self._partial_shown = False
        #: The role of each call party's stream seen (its stream and emotion events carry it).
        self.roles: dict[str, str] = {}

    def show(self, event: AnyEvent | Mapping[str, Any]) -> None:
        if self.options.json_lines:
            self._write(dumps(_wire(event)) + "\n")
            return
        event = _typed(event)
        if isinstance(event, (StreamEvent, EmotionEvent)) and event.role:
            self.roles[event.stream] = event.role
        if (isinstance(event, EmotionEvent) and event.kind == "partial" and self.tty
                and not self.options.partials_as_lines):
            self._write("\r\x1b[2K" + format_partial(event))
            self._partial_shown = True
            return
        line = format_event(event, self.options, self.roles)
        if line is not None:
            self._write(("\r\x1b[2K" if self._partial_shown else "") + line + "\n")
            self._partial_shown = False

    def close(self) -> None:
        if self._partial_shown:
            self._write("\n")
            self._partial_shown = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.lines += text.count("\n")


# --------------------------------------------------------------------------- the command


async def _watch(url: str, args: argparse.Namespace, printer: Printer) -> None:
    from serstream.client import UnknownEvent, events

    since = getattr(args, "since", None)
    async for event in events(url, stream=args.stream or None, call=getattr(args, "call", None) or None,
                              reconnect=not args.no_retry,
                              token=resolve_token(args), ca_file=getattr(args, "ca_file", None), since=since):
        if isinstance(event, UnknownEvent):
            # Newer schema versions and unknown types still print raw with --json;
            # the client has logged once what it could not read.
            if args.json and event.raw:
                printer.show(dict(event.raw))
            continue
        printer.show(event)


def run_watch(args: argparse.Namespace) -> int:
    """``serstream watch``: returns the exit code (0 on Ctrl-C or --duration, 2 on a user error)."""
    from serstream.client import ClientError

    try:
        url = events_url(args.url)
        resolve_token(args)  # a bad --token-file is said here, once
        if args.duration is not None and args.duration < 0:
            raise WatchError("--duration must be >= 0")
        if getattr(args, "since", None) is not None and args.since < 0:
            raise WatchError("--since must be an event id >= 0")
    except WatchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    options = WatchOptions(json_lines=args.json, partials_as_lines=args.partials, stats=args.stats)
    printer = Printer(sys.stdout, options, tty=bool(getattr(sys.stdout, "isatty", lambda: False)()))
    if not args.json:
        where = f"{url} (stream {args.stream})" if args.stream else url
        if getattr(args, "call", None):
            where += f" (call {args.call})"
        print(f"{PROG}: watching {where}; Ctrl-C to stop", file=sys.stderr, flush=True)

    async def bounded() -> None:
        if args.duration is None:
            await _watch(url, args, printer)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_watch(url, args, printer), args.duration)

    try:
        asyncio.run(bounded())
    except ClientError as exc:
        printer.close()
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # stdout closed by the reader (e.g. `| head`): nothing left to say, not even at exit.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0
    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
        printer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serstream.watch``: the same command without the rest of the CLI."""
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    parser = argparse.ArgumentParser(prog=f"{PROG} watch", description="Print a monitor's events live.")
    add_watch_arguments(parser)
    return run_watch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
