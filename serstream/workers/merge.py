"""Pure helpers of the inference tier and the stats of a ``--workers`` pool.

* :func:`merge_requests` / :func:`split_output`: several workers' batches
  become one model call (audio padded to the longest row, state rows in
  order) and its output is cut back into each worker's rows.
* :func:`sum_stats`: the counters of every worker's ``Monitor.stats()``
  summed, so ``stats()`` and ``/metrics`` see every stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from serstream.inference.session import InferenceOutput

__all__ = ["Part", "merge_requests", "padding_share", "split_output", "sum_stats"]

#: ``state``: state input name -> one row (or None: no state yet) per window.
State = Mapping[str, Sequence[np.ndarray | None]]


@dataclass(frozen=True)
class Part:
    """One worker's batch as it reached the inference tier."""

    audio: np.ndarray  # float32 [rows, width]
    lengths: np.ndarray  # int64 [rows]
    state: State | None

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])


def padding_share(parts: Sequence[Part]) -> float:
    """Share of the merged call's samples that would be padding (0.0 for no rows).

    The model computes every padded sample, so the tier merges a batch into the
    call only while this stays small (the rule of serstream/core/batcher.py).
    """
    rows = sum(p.rows for p in parts)
    width = max((int(p.audio.shape[1]) for p in parts if p.audio.ndim == 2), default=0)
    if rows == 0 or width == 0:
        return 0.0
    used = sum(int(p.lengths.sum()) for p in parts)
    return 1.0 - used / float(rows * width)


def merge_requests(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray, dict[str, list[np.ndarray | None]] | None]:
    """(audio, lengths, state) of one model call holding every part's rows, in order.

    Rows are zero-padded to the widest part (the model reads ``lengths``, so
    the padding is never heard). A state input missing from a part (it has
    none) gives None rows: "no state yet".
    """
    if not parts:
        raise ValueError("merge_requests needs at least one part")
    width = max(int(p.audio.shape[1]) if p.audio.ndim == 2 else 0 for p in parts)
    rows = sum(p.rows for p in parts)
    audio = np.zeros((rows, max(1, width)), dtype=np.float32)
    lengths = np.zeros(rows, dtype=np.int64)
    names = sorted({name for p in parts if p.state for name in p.state})
    state: dict[str, list[np.ndarray | None]] | None = {name: [] for name in names} if names else None
    at = 0
    for p in parts:
        n = p.rows
        if p.audio.shape[0] != n:
            raise ValueError(f"a part has {p.audio.shape[0]} audio rows but {n} lengths")
        audio[at:at + n, : p.audio.shape[1]] = p.audio
        lengths[at:at + n] = p.lengths
        if state is not None:
            for name in names:
                given = (p.state or {}).get(name)
                state[name].extend(list(given) if given is not None else [None] * n)
        at += n
    return audio, lengths, state


def split_output(output: InferenceOutput, sizes: Sequence[int]) -> list[InferenceOutput]:
    """Cut one model call's output into consecutive parts of ``sizes`` rows (``raw`` left out)."""
    if sum(sizes) != output.probs.shape[0]:
        raise ValueError(f"output has {output.probs.shape[0]} rows, parts want {sum(sizes)}")
    out: list[InferenceOutput] = []
    at = 0
    for n in sizes:
        cut = slice(at, at + n)
        out.append(InferenceOutput(
            probs=np.ascontiguousarray(output.probs[cut]),
            avd=np.ascontiguousarray(output.avd[cut]),
            gender_probs=np.ascontiguousarray(output.gender_probs[cut]),
            state_updates={k: np.ascontiguousarray(v[cut]) for k, v in output.state_updates.items()},
        ))
        at += n
    return out


def sum_stats(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every number of ``snapshots`` summed key by key (nested dicts too); other values: the first seen.

    Counters (drops, windows, audio samples) add up across workers; the
    caller replaces what does not add (latency percentiles, rates, uptime)
    with its own view.
    """
    total: dict[str, Any] = {}
    for snap in snapshots:
        for key, value in snap.items():
            if isinstance(value, Mapping):
                total[key] = sum_stats([total.get(key) or {}, value])
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                total.setdefault(key, value)
            else:
                prior = total.get(key)
                total[key] = value + prior if isinstance(prior, (int, float)) and not isinstance(prior, bool) else value
    return total
