"""Where the monitor finds its ONNX model.

The order is: an explicit ``--model PATH``, then the ``SERSTREAM_MODEL``
environment variable, then the shipped default ``models/serstream-default.onnx``
beside the package (the repository layout). Nothing here opens the model;
:mod:`serstream.inference.session` loads and validates it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

__all__ = [
    "MODEL_ENV",
    "DEFAULT_MODEL_NAME",
    "ModelNotFoundError",
    "default_model_path",
    "resolve_model_path",
]

#: Environment variable that names a model when ``--model`` is not given.
MODEL_ENV = "SERSTREAM_MODEL"

#: File name of the shipped model under ``<repo>/models/``.
DEFAULT_MODEL_NAME = "serstream-default.onnx"


class ModelNotFoundError(FileNotFoundError):
    """No model file where the user (or the default) said it would be; one-line message."""


def default_model_path() -> Path:
    """The shipped model: ``<repo>/models/serstream-default.onnx``, located from this package."""
    return Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME


def resolve_model_path(
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Pick the model file to load; raise :class:`ModelNotFoundError` saying where it looked."""
    environ = os.environ if env is None else env
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path} (given with --model)")
        return path
    from_env = environ.get(MODEL_ENV, "").strip()
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path} (from ${MODEL_ENV})")
        return path
    path = default_model_path()
    if not path.is_file():
        raise ModelNotFoundError(
            f"no model: --model not given, ${MODEL_ENV} not set, and the default {path} "
            "does not exist (train one with `python -m training` or pass --model PATH)"
        )
    return path
