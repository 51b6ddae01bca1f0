"""The decoded-corpus cache is written atomically, also by two runs at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from training.cache import save_npz_atomically


def _write_many(target: str, value: int, rounds: int, start: Any) -> None:
    audio = np.full(1_000_000, value, dtype=np.int16)
    start.wait()  # both writers go at once, as two runs decoding the same corpus do
    for _ in range(rounds):
        save_npz_atomically(Path(target), audio=audio)


def test_two_processes_writing_the_same_cache_both_finish(tmp_path: Path) -> None:
    # Two training runs started side by side on an empty cache both write it. With one shared
    # temporary name, one run's rename found the file already moved and the run died.
    target = tmp_path / "corpus-abc.npz"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    writers = [ctx.Process(target=_write_many, args=(str(target), v, 30, start)) for v in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    with np.load(target) as saved:  # whole: one writer's array, never a mix or a torn file
        assert saved["audio"].shape == (1_000_000,)
        assert len(set(saved["audio"].tolist())) == 1
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_a_write_replaces_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "c.npz"
    save_npz_atomically(target, x=np.arange(3))
    save_npz_atomically(target, x=np.arange(5))
    with np.load(target) as saved:
        np.testing.assert_array_equal(saved["x"], np.arange(5))
