"""serstream's exceptions and the one way to turn an error into one line.

Every exception serstream raises on purpose is defined here and derives from
:class:`SerstreamError`, so a caller can catch "anything serstream refused"
in one clause. Each keeps the built-in base it had before this module
existed (``MonitorError`` is still a ``RuntimeError``, ``CodecError`` still a
``ValueError``, ``ModelNotFoundError`` still a ``FileNotFoundError``), so
``except ValueError`` code written against the old classes keeps working.
The modules that raise them re-export them (``from serstream.monitor import
MonitorError`` still works).

The rule for users is one line per problem, never a traceback:
:func:`one_line` is what every module uses to make that line from an
exception (or a text) it did not write itself.

Not here, on purpose:

* the client's exceptions (``ClientError`` and its subclasses,
  ``EventError``) live in the ``serstream-client`` distribution
  (``clients/python/src/serstream_client``), which depends only on
  ``websockets`` and so cannot import serstream;
* the training code's exceptions (``DatasetError``, ``ExportError``, ...)
  belong to its own distribution (``training/``, ``serstream-training``);
* private control-flow exceptions that never leave their module (e.g.
  ``serstream.sources.ingest._Refused``, which carries a refusal to the
  connection handler).

Pure: no imports from the rest of serstream, so any module can import it.
"""

from __future__ import annotations

__all__ = [
    "MAX_CLOSE_REASON_BYTES",
    "AnalyzeError",
    "ClusterError",
    "CodecError",
    "ContractError",
    "DeviceError",
    "HelloError",
    "InferenceError",
    "ModelNotFoundError",
    "MonitorError",
    "RecordError",
    "RtpError",
    "SerstreamError",
    "ServerError",
    "SourceError",
    "StreamIdTaken",
    "UserError",
    "WatchError",
    "fit_close_reason",
    "one_line",
]

#: RFC 6455 §5.5: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES = 123


def one_line(value: BaseException | str, *, first_line: bool = False, limit: int | None = 300) -> str:
    """``value``'s text as one line for people: whitespace runs (newlines too) become one space.

    ``first_line=True`` keeps only the first non-empty line (for messages whose
    later lines are a dump, e.g. a library's multi-line error). ``limit`` cuts
    the result to that many characters, the last three being "..."; None keeps
    it whole. An exception with no text gives its type name (``KeyError()`` ->
    "KeyError"), so a reported error is never blank; an empty text stays "".
    """
    if limit is not None and limit < 4:
        raise ValueError(f"limit must be >= 4 (room for '...') or None, got {limit}")
    text = str(value).strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    text = " ".join(text.split())
    if not text and isinstance(value, BaseException):
        text = type(value).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def fit_close_reason(reason: str) -> str:
    """``reason`` cut to fit a close frame (123 UTF-8 bytes, whole characters, "..." when cut)."""
    data = reason.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


class SerstreamError(Exception):
    """The base of every exception serstream raises on purpose; its message is one line for people."""


# ---------------------------------------------------------------- command line, server, clients


class UserError(SerstreamError):
    """A problem the user can fix; printed as one ``serstream: error:`` line, exit code 2 (cli.py)."""


class WatchError(SerstreamError):
    """A problem the user of ``serstream watch`` can fix: one line, exit code 2 (watch.py)."""


class ServerError(SerstreamError, RuntimeError):
    """The server cannot start (e.g. the port is taken); the message is one line for the user (server.py)."""


class RecordError(SerstreamError, RuntimeError):
    """The database cannot be opened or written; the message is one line for the user (record.py)."""


class AnalyzeError(SerstreamError, ValueError):
    """A bad argument to the analysis (unreadable CSV, missing columns); one line (analyze.py)."""


# ---------------------------------------------------------------- monitor and sources


class MonitorError(SerstreamError, RuntimeError):
    """A request the monitor cannot serve (bad stream parameters, too many streams); one line (monitor.py)."""


class SourceError(MonitorError):
    """An audio source cannot be opened or read (device, file, network); one line."""


class StreamIdTaken(MonitorError):
    """The stream id asked for (or, with ``unique=True``, every suffix of it) is already open."""


class CodecError(SerstreamError, ValueError):
    """An unknown codec name; the message is one line and lists the known ones (codecs.py)."""


class RtpError(SerstreamError, ValueError):
    """A datagram that is not an acceptable RTP packet (rtp/packet.py).

    ``cause`` is a stable short id (for counters and "report once" logic);
    ``message`` is a one-line human explanation.
    """

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause
        self.message = message


class HelloError(SerstreamError, ValueError):
    """A hello the server refuses: ``code`` is the WebSocket close code, the message its reason.

    The reason always fits a WebSocket close frame (:func:`fit_close_reason`)
    (sources/ingest_session.py).
    """

    def __init__(self, code: int, reason: str) -> None:
        reason = fit_close_reason(reason)
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------- model and inference


class ContractError(SerstreamError, ValueError):
    """A model, its metadata or its tensors do not match the serstream contract (contract.py)."""


class ModelNotFoundError(SerstreamError, FileNotFoundError):
    """No model file where the user (or the default) said it would be; one-line message (models.py)."""


class DeviceError(SerstreamError, RuntimeError):
    """The requested device cannot be used (e.g. ``device="cuda"`` without a GPU) (inference/session.py)."""


class ClusterError(SerstreamError, RuntimeError):
    """A Ray cluster cannot be reached or the inference cannot be deployed on it; one line (cluster/)."""


class InferenceError(SerstreamError, RuntimeError):
    """A batch could not be run, or the model produced non-finite values (inference/session.py)."""
