"""Where the monitor finds its ONNX model.

The order is: an explicit ``--model PATH``, then the ``SERSTREAM_MODEL``
environment variable, then the shipped default, which is package data
(``serstream/data/serstream-default.onnx``, found with :mod:`importlib.resources`),
so a wheel installed with pip carries it and finds it from any folder. In the
repository ``serstream/data/`` holds symlinks to ``models/``, where training
writes the model and its card; the wheel build resolves them into files.
Nothing here opens the model; :mod:`serstream.inference.session` loads and
validates it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Mapping

from serstream.errors import ModelNotFoundError

__all__ = [
    "MODEL_ENV",
    "DEFAULT_MODEL_NAME",
    "ModelNotFoundError",
    "default_model_path",
    "resolve_model_path",
]

#: Environment variable that names a model when ``--model`` is not given.
MODEL_ENV = "SERSTREAM_MODEL"

#: File name of the shipped model in the package data (``serstream/data/``).
DEFAULT_MODEL_NAME = "serstream-default.onnx"


def default_model_path() -> Path:
    """The shipped model: ``serstream/data/serstream-default.onnx`` in the installed package."""
    # A regular (directory) install gives a real path; ONNX Runtime needs one, so a
    # zip-imported package (not something pip produces) is not supported here.
    return Path(str(resources.files("serstream").joinpath("data", DEFAULT_MODEL_NAME)))


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
