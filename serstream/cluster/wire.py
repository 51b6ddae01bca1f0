"""What travels between the monitor and an inference replica: one window in, one row of outputs back.

Pure (numpy only, no Ray): :func:`split_batch` turns the padded batch the
inference worker hands its backend into one :class:`WindowRequest` per
window, each cut to its own length and carrying its own rows of every state
input; :func:`join_results` stacks the replicas' :class:`WindowResult`\\ s
back into the :class:`~serstream.inference.session.InferenceOutput` the
worker expects, row ``i`` for window ``i``.

Why one request per window: a request holds everything its result depends
on (audio and the stream's speaker state, fixed by the stream's order gate
before the window left), so no replica keeps per-stream state, any replica
can serve any window, Ray Serve is free to batch windows from every monitor
together, and a window whose replica died can simply be sent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from serstream.contract import StateInput
from serstream.inference.session import InferenceOutput

__all__ = ["WindowRequest", "WindowResult", "split_batch", "join_results", "result_rows"]

StateArg = Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None


@dataclass(frozen=True)
class WindowRequest:
    """One window for a replica: 16 kHz float32 audio and its stream's state rows (None: no state yet)."""

    audio: np.ndarray
    state: dict[str, np.ndarray | None] = field(default_factory=dict)


@dataclass(frozen=True)
class WindowResult:
    """One window's model outputs, as :class:`InferenceOutput` holds them for one row.

    ``replica`` and ``node`` say who computed it (counted by the backend, so a
    run can show that every replica and node served windows). ``error`` is set
    (one line, the output arrays empty) when the model failed on this window.
    """

    probs: np.ndarray
    avd: np.ndarray
    gender_probs: np.ndarray
    state_updates: dict[str, np.ndarray] = field(default_factory=dict)
    replica: str = ""
    node: str = ""
    error: str | None = None


def split_batch(
    audio: np.ndarray, lengths: np.ndarray, state: StateArg, specs: Sequence[StateInput]
) -> list[WindowRequest]:
    """One request per row of a padded batch; raises ValueError (one line) on inconsistent shapes."""
    audio = np.asarray(audio, np.float32)
    lengths = np.asarray(lengths, np.int64)
    if audio.ndim != 2 or audio.shape[0] == 0:
        raise ValueError(f"audio must be a non-empty [batch, samples] array, got {audio.shape}")
    batch = audio.shape[0]
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    if lengths.min() < 0 or lengths.max() > audio.shape[1]:
        raise ValueError(f"lengths must lie in [0, {audio.shape[1]}]")
    given = state or {}
    rows: list[dict[str, np.ndarray | None]] = [{} for _ in range(batch)]
    for spec in specs:
        values = given.get(spec.name)
        if values is None:
            for row in rows:
                row[spec.name] = None
            continue
        if len(values) != batch:
            raise ValueError(f"state {spec.name!r} has {len(values)} rows for a batch of {batch}")
        for i, value in enumerate(values):
            rows[i][spec.name] = None if value is None else np.asarray(value, np.float32).reshape(-1).copy()
    return [
        WindowRequest(audio=np.ascontiguousarray(audio[i, : int(lengths[i])]), state=rows[i])
        for i in range(batch)
    ]


def join_results(results: Sequence[WindowResult], specs: Sequence[StateInput]) -> InferenceOutput:
    """Stack per-window results (in request order) into one batch output."""
    if not results:
        raise ValueError("join_results needs at least one result")
    updates: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.update_output is None:
            continue
        if not all(spec.name in r.state_updates for r in results):
            raise ValueError(f"a replica's result lacks the state update for {spec.name!r}")
        updates[spec.name] = np.stack([np.asarray(r.state_updates[spec.name], np.float32) for r in results])
    return InferenceOutput(
        probs=np.stack([np.asarray(r.probs, np.float32) for r in results]),
        avd=np.stack([np.asarray(r.avd, np.float32) for r in results]),
        gender_probs=np.stack([np.asarray(r.gender_probs, np.float32) for r in results]),
        state_updates=updates,
    )


def result_rows(output: InferenceOutput, replica: str = "", node: str = "") -> list[WindowResult]:
    """A replica's batch output cut back into one result per window (the inverse of :func:`join_results`)."""
    return [
        WindowResult(
            probs=output.probs[i].copy(),
            avd=output.avd[i].copy(),
            gender_probs=output.gender_probs[i].copy(),
            state_updates={name: np.asarray(rows[i]).copy() for name, rows in output.state_updates.items()},
            replica=replica,
            node=node,
        )
        for i in range(output.probs.shape[0])
    ]
