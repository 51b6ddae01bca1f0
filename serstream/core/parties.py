"""Two-party (or N-party) calls: multi-channel audio split into one mono stream per party.

A call recorded or carried with one party per channel (a stereo call
recording, ``/ingest`` with ``channels: 2``, mod_audio_fork's stereo mode)
becomes one stream per channel, each tagged with the ``call`` it belongs to
and its ``role`` in it (``left``/``right`` by default, ``caller``/``callee``
or any names the user gives). This module is the one place that decides the
party streams' ids and roles and de-interleaves the audio; the sources only
push what it returns.

The parties stay on one clock because every party's block is cut from the
same frames: block *k* of each party holds the same sample frames of the
source, so the same instant has the same stream time (``t0``) in every party
(as long as each party's stream takes every block; the sources wait for
space in all the parties' rings before pushing any).

Pure: no I/O, no clocks; numpy in, numpy out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_ROLES",
    "MAX_PARTIES",
    "Party",
    "PartySplit",
    "default_roles",
    "parse_roles",
    "plan_parties",
    "take_channel",
]

#: The roles of a two-channel split when the user names none: the channels' own names.
DEFAULT_ROLES: Final[tuple[str, str]] = ("left", "right")
#: The most channels a split makes parties of (the ``/ingest`` hello's channel limit).
MAX_PARTIES: Final[int] = 8

_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")


def default_roles(channels: int) -> tuple[str, ...]:
    """``left``/``right`` for two channels, ``ch1`` ... ``chN`` otherwise (a mono source has ``ch1``)."""
    if channels == 2:
        return DEFAULT_ROLES
    return tuple(f"ch{i + 1}" for i in range(channels))


def parse_roles(roles: str | Sequence[str] | None, channels: int) -> tuple[str, ...]:
    """The role of each channel; ValueError (one line) unless there is one distinct, valid name per channel.

    ``roles`` is a comma-separated string (``"caller,callee"``, as on the command
    line), a sequence of names (as in the ``/ingest`` hello), or None for
    :func:`default_roles`.
    """
    if not 1 <= channels <= MAX_PARTIES:
        raise ValueError(f"cannot split {channels} channels into parties (1-{MAX_PARTIES})")
    if roles is None:
        return default_roles(channels)
    names = [part.strip() for part in roles.split(",")] if isinstance(roles, str) else list(roles)
    for name in names:
        if not isinstance(name, str) or not _ROLE.fullmatch(name):
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
            raise ValueError(f"role {shown} must be 1-32 letters, digits and ._+- (starting with a letter or digit)")
    if len(set(names)) != len(names):
        raise ValueError(f"roles must differ from each other, got {','.join(names)}")
    if len(names) != channels:
        raise ValueError(f"{len(names)} roles ({','.join(names)}) for {channels} channels: give one per channel")
    return tuple(names)


@dataclass(frozen=True)
class Party:
    """One party of a call: the channel its audio is on, its role and its stream id."""

    channel: int
    role: str
    stream: str


@dataclass(frozen=True)
class PartySplit:
    """How one multi-channel source becomes its parties' streams (see :func:`plan_parties`)."""

    call: str
    parties: tuple[Party, ...]

    @property
    def channels(self) -> int:
        return len(self.parties)

    @property
    def stream_ids(self) -> tuple[str, ...]:
        return tuple(p.stream for p in self.parties)

    def split(self, block: npt.ArrayLike) -> list[npt.NDArray[np.float32]]:
        """``[frames, channels]`` samples -> one contiguous float32 mono block per party, same length each.

        A 1-D block is taken as interleaved frames. int16 is scaled to [-1, 1)
        as the monitor does. ValueError when the block does not hold whole
        frames of this source's channel count.
        """
        data = np.asarray(block)
        n = self.channels
        if data.ndim == 1:
            if data.size % n:
                raise ValueError(f"{data.size} interleaved samples are not whole frames of {n} channels")
            data = data.reshape(-1, n)
        if data.ndim != 2 or data.shape[1] != n:
            raise ValueError(f"a block of shape {data.shape} is not [frames, {n}]")
        return [take_channel(data, party.channel) for party in self.parties]


def take_channel(block: npt.ArrayLike, channel: int) -> npt.NDArray[np.float32]:
    """Channel ``channel`` (0-based) of ``[frames, channels]`` samples as contiguous float32 mono.

    int16 is scaled to [-1, 1) as the monitor does; ValueError for another
    dtype or a channel the block does not have.
    """
    data = np.asarray(block)
    if data.ndim != 2:
        raise ValueError(f"a block of shape {data.shape} is not [frames, channels]")
    if not 0 <= channel < data.shape[1]:
        raise ValueError(f"has {data.shape[1]} channels, the party is channel {channel + 1}")
    column = data[:, channel]
    if data.dtype == np.int16:
        return (column.astype(np.float32) / np.float32(32768.0)).astype(np.float32)
    if np.issubdtype(data.dtype, np.floating):
        return np.ascontiguousarray(column, dtype=np.float32)
    raise ValueError(f"samples must be float or int16, got {data.dtype}")


def plan_parties(base: str, channels: int, roles: str | Sequence[str] | None = None,
                 call: str | None = None) -> PartySplit:
    """The parties of a ``channels``-channel source named ``base``: stream ids ``<base>:<role>``.

    ``call`` defaults to ``base`` (the name the source would have had as one
    stream), so every party's events name the same call. ValueError (one
    line) for roles that do not fit the channels (:func:`parse_roles`).
    """
    names = parse_roles(roles, channels)
    if not base:
        raise ValueError("a call's parties need a base stream name")
    return PartySplit(
        call=call or base,
        parties=tuple(Party(channel=i, role=role, stream=f"{base}:{role}") for i, role in enumerate(names)),
    )
