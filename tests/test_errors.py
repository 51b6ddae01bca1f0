"""serstream.errors: the one ``one_line`` and the exception tree every module raises from."""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import pytest

import serstream
from serstream import errors
from serstream.errors import SerstreamError, one_line

ROOT = Path(serstream.__file__).resolve().parent


def test_whitespace_of_a_multi_line_message_collapses_to_single_spaces() -> None:
    exc = ValueError("cannot read audio\n  file x.wav:\tformat not\r\nrecognised  ")
    assert one_line(exc) == "cannot read audio file x.wav: format not recognised"


def test_an_exception_without_text_gives_its_type_name_and_an_empty_text_stays_empty() -> None:
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("  \n ")) == "OSError"
    assert one_line("") == ""
    assert one_line("  \n\t") == ""


def test_first_line_keeps_only_the_first_non_empty_line() -> None:
    text = "\n\n  model run failed:   bad shape\nTraceback (most recent call last):\n  File ..."
    assert one_line(text, first_line=True) == "model run failed: bad shape"
    assert one_line(RuntimeError(text), first_line=True) == "model run failed: bad shape"
    assert "Traceback" in one_line(text)


def test_limit_cuts_with_an_ellipsis_and_none_keeps_everything() -> None:
    text = "x" * 500
    assert one_line(text) == "x" * 297 + "..."
    assert len(one_line(text)) == 300
    assert one_line(text, limit=10) == "x" * 7 + "..."
    assert one_line(text, limit=None) == text
    assert one_line("exactly ten", limit=11) == "exactly ten"
    with pytest.raises(ValueError, match="limit"):
        one_line(text, limit=3)


def test_the_session_helper_strips_the_onnx_runtime_prefix_before_one_line() -> None:
    from serstream.inference.session import _one_line as session_one_line

    exc = RuntimeError(
        "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from /tmp/m.onnx failed:Protobuf parsing failed.\n"
        "second line of detail"
    )
    assert session_one_line(exc) == "Load model from /tmp/m.onnx failed:Protobuf parsing failed."
    long = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " + "y" * 400)
    assert session_one_line(long) == "y" * 297 + "..."
    assert session_one_line(RuntimeError()) == "RuntimeError"


def _exception_classes() -> list[type[BaseException]]:
    return [
        obj for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    ]


def test_every_exception_in_errors_derives_from_serstream_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 16  # the tree below, so a class lost in a move shows here
    for cls in classes:
        assert issubclass(cls, SerstreamError), cls
        assert cls.__doc__, f"{cls.__name__} has no docstring"


@pytest.mark.parametrize(("name", "builtin"), [
    ("MonitorError", RuntimeError), ("SourceError", RuntimeError), ("StreamIdTaken", RuntimeError),
    ("ServerError", RuntimeError), ("RecordError", RuntimeError), ("DeviceError", RuntimeError),
    ("InferenceError", RuntimeError), ("AnalyzeError", ValueError), ("ContractError", ValueError),
    ("CodecError", ValueError), ("RtpError", ValueError), ("HelloError", ValueError),
    ("ModelNotFoundError", FileNotFoundError),
])
def test_the_old_builtin_bases_are_kept_so_existing_except_clauses_still_catch(
    name: str, builtin: type[BaseException]
) -> None:
    assert issubclass(getattr(errors, name), builtin)


@pytest.mark.parametrize(("module", "name"), [
    ("serstream.cli", "UserError"), ("serstream.monitor", "MonitorError"), ("serstream.monitor", "SourceError"),
    ("serstream.monitor", "StreamIdTaken"), ("serstream.analyze", "AnalyzeError"),
    ("serstream.contract", "ContractError"), ("serstream.record", "RecordError"), ("serstream.codecs", "CodecError"),
    ("serstream.watch", "WatchError"), ("serstream.inference.session", "DeviceError"),
    ("serstream.inference.session", "InferenceError"), ("serstream.sources.ingest_session", "HelloError"),
    ("serstream.rtp.packet", "RtpError"), ("serstream.models", "ModelNotFoundError"),
    ("serstream.server", "ServerError"),
])
def test_the_old_modules_still_export_the_same_classes(module: str, name: str) -> None:
    import importlib

    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_no_public_exception_class_is_defined_outside_errors_py() -> None:
    """A new public exception belongs in errors.py (private control-flow ones may stay local)."""
    known = {cls.__name__ for cls in _exception_classes()} | {
        name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
    }
    strays = []
    for path in ROOT.rglob("*.py"):
        if path.name == "errors.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if node.name.endswith(("Error", "Exception")) or bases & known:
                strays.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not strays, strays


def test_hello_error_fits_its_reason_into_a_close_frame() -> None:
    exc = errors.HelloError(1008, "é" * 200)
    assert exc.code == 1008
    assert len(exc.reason.encode("utf-8")) <= errors.MAX_CLOSE_REASON_BYTES
    assert exc.reason.endswith("...") and str(exc) == exc.reason


def test_rtp_error_keeps_cause_and_message() -> None:
    exc = errors.RtpError("bad_version", "version 1, expected 2")
    assert (exc.cause, exc.message, str(exc)) == ("bad_version", "version 1, expected 2",
                                                 "bad_version: version 1, expected 2")
