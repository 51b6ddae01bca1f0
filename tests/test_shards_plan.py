"""The parts of ``cluster --shards`` that need no Ray: batching of a shard's calls, clocks, loss rules, the pool.

The pool test runs :class:`~serstream.workers.pool.WorkerPool` over a
transport that is not a process (``ThreadLink``: the real worker loop,
:func:`~serstream.workers.child.serve_worker`, with the real ``Monitor`` and
ONNX model, on a thread, its messages in memory), the way it runs over Ray
actors: a slot whose link dies is restarted and its stream reopened; a link
that says its backend is gone (a Ray cluster lost) makes the pool give up:
its stream is closed with ``worker_lost``, nothing restarts, the fatal
callback gets one line, the other slot's stream finishes untouched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from serstream.cluster.shards import MAX_STEP_BYTES, clock_offset, shift_arrivals, take_batch
from serstream.inference.session import EmotionModel
from serstream.monitor import MonitorConfig
from serstream.workers.child import _Up, serve_worker
from serstream.workers.link import Ready
from serstream.workers.plan import after_loss
from serstream.workers.pool import WORKER_LOST, WorkerPool
from tests.audio import speech_with_pauses

CHUNK = 320


def audio_item(sid: str, at: float, n: int) -> tuple[Any, ...]:
    return ("audio", sid, at, np.zeros(n, np.float32))


# --------------------------------------------------------------------------- pure rules


def test_take_batch_keeps_order_and_splits_at_the_byte_limit() -> None:
    pending: deque[tuple[Any, ...]] = deque([
        ("items", [("open", "a", {}), audio_item("a", 1.0, 100), audio_item("b", 1.1, 100), ("close", "a", "end")]),
        ("result", 7, None, "x"),
        ("items", [audio_item("b", 1.2, 100)]),
    ])
    first = take_batch(pending, max_bytes=600)  # 400 bytes per block: one block fits
    assert [m[0] for m in first] == ["items"]
    assert [(i[0], i[1]) for i in first[0][1]] == [("open", "a"), ("audio", "a")]
    second = take_batch(pending, max_bytes=600)
    assert [(i[0], i[1]) for i in second[0][1]] == [("audio", "b"), ("close", "a")]
    assert second[1] == ("result", 7, None, "x")  # non-audio messages never wait
    assert [m[0] for m in second] == ["items", "result"]  # the next block (400 more) waits
    third = take_batch(pending, max_bytes=600)
    assert [(i[0], i[1], i[2]) for i in third[0][1]] == [("audio", "b", 1.2)]
    assert not pending and take_batch(pending) == []
    # A single block over the limit still goes, alone.
    pending.append(("items", [audio_item("c", 2.0, MAX_STEP_BYTES), audio_item("c", 2.1, 10)]))
    big = take_batch(pending)
    assert len(big[0][1]) == 1 and len(pending) == 1 and pending[0][1][0][2] == 2.1


def test_shift_arrivals_moves_only_audio_times_onto_the_shard_clock() -> None:
    block = np.ones(4, np.float32)
    messages = [("items", [("open", "a", {}), ("audio", "a", 10.0, block), ("stop", True)]), ("result", 1, None, None)]
    moved = shift_arrivals(messages, 5.5)
    assert moved[0][1][0] == ("open", "a", {}) and moved[0][1][2] == ("stop", True)
    assert moved[0][1][1][2] == 15.5 and moved[0][1][1][3] is block
    assert moved[1] == messages[1]
    assert shift_arrivals(messages, 0.0) == messages


def test_clock_offset_trusts_the_quickest_round_trip() -> None:
    # The shard's clock is 100 s ahead; the slow first reading (actor start-up) would say 102 s.
    readings = [(0.0, 104.0, 4.0), (10.0, 110.01, 10.02), (20.0, 120.1, 20.2)]
    assert clock_offset(readings) == pytest.approx(100.0, abs=0.011)
    with pytest.raises(ValueError):
        clock_offset([])


def test_after_loss_restarts_unless_never_started_or_the_backend_is_gone() -> None:
    assert after_loss(first_start=True, was_ready=False, backend_gone=False) == "start_failed"
    assert after_loss(first_start=True, was_ready=False, backend_gone=True) == "start_failed"
    assert after_loss(first_start=True, was_ready=True, backend_gone=False) == "restart"
    assert after_loss(first_start=False, was_ready=False, backend_gone=False) == "restart"
    assert after_loss(first_start=False, was_ready=True, backend_gone=True) == "fatal"


# --------------------------------------------------------------------------- the pool over another transport


class ThreadLink:
    """A Link whose worker is ``serve_worker`` on a thread here: the shard actor's loop without Ray."""

    made: list[ThreadLink] = []

    def __init__(self, index: int, model: EmotionModel, config: MonitorConfig) -> None:
        self.index = index
        self.gone: str | None = None
        self._cond = threading.Condition()
        self._in: deque[tuple[Any, ...]] = deque()
        self._ended = False
        self._why = "running"
        self._down: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        link = self

        class Down:
            def recv(self) -> tuple[Any, ...]:
                message = link._down.get()
                if message is None:
                    raise EOFError("link ended")
                return message

        class UpConn:
            def send(self, message: tuple[Any, ...]) -> None:
                with link._cond:
                    if not link._ended:
                        link._in.append(message)
                        link._cond.notify_all()

        self.thread = threading.Thread(target=serve_worker, args=(Down(), _Up(UpConn()), model, config), daemon=True)
        self.thread.start()
        ThreadLink.made.append(self)

    pid = None

    @property
    def label(self) -> str:
        return f"thread {self.index}"

    def send(self, message: tuple[Any, ...]) -> None:
        if self._ended:
            raise OSError("ended")
        self._down.put(message)

    def wait(self, timeout: float) -> Ready:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._in) or self._ended, timeout=timeout)
            return "message" if self._in else "ended" if self._ended else None

    def poll(self) -> bool:
        return bool(self._in)

    def recv(self) -> tuple[Any, ...]:
        with self._cond:
            if self._in:
                msg = self._in.popleft()
                if msg[0] == "bye":
                    self._end("stopped")
                return msg
        raise EOFError("ended")

    def close_down(self) -> None:
        pass

    def close_up(self) -> None:
        pass

    def is_alive(self) -> bool:
        return not self._ended

    def die(self, why: str, gone: str | None = None) -> None:
        """What a killed actor looks like from the pool: nothing more comes up; the reason."""
        self.gone = gone
        self._end(why)

    def _end(self, why: str) -> None:
        with self._cond:
            if not self._ended:
                self._ended, self._why = True, why
                self._in.clear()  # an actor's unsent replies die with it
            self._cond.notify_all()
        self._down.put(None)  # the worker loop ends, its monitor stops

    def kill(self) -> None:
        self._end("killed")

    def join(self, timeout: float) -> None:
        self._end(self._why if self._why != "running" else "stopped")
        self.thread.join(timeout)

    def how(self) -> str:
        return self._why

    def stalled(self, seconds: float) -> None:
        self.die(f"not started within {seconds:g} s", gone="stalled")


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


def make_pool(model: EmotionModel, sink: Callable[[dict[str, Any]], None]) -> WorkerPool:
    ThreadLink.made = []
    config = MonitorConfig(max_batch=8, close_timeout_s=30.0)
    return WorkerPool(model, config, sink, workers=2, name="shard",
                      link_factory=lambda index, info, device, cfg: ThreadLink(index, model, cfg))


class Events:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.items.append(event)

    def of(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.items if e.get("stream") == stream]

    def wait(self, what: Callable[[], bool], timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, why
            time.sleep(0.02)


def push(handle: Any, audio: np.ndarray) -> None:
    for start in range(0, audio.shape[0], CHUNK):
        assert handle.wait_for_space(CHUNK, timeout=30)
        handle.push(audio[start:start + CHUNK])


def opened(events: Events, sid: str) -> int:
    return sum(1 for e in events.of(sid) if e["type"] == "stream" and e["state"] == "open")


def closed(events: Events, sid: str) -> list[dict[str, Any]]:
    return [e for e in events.of(sid) if e["type"] == "stream" and e["state"] == "closed"]


def test_a_dead_link_is_restarted_and_a_gone_backend_gives_up_with_one_line(model: EmotionModel) -> None:
    events = Events()
    pool = make_pool(model, events)
    fatal: list[str] = []
    pool.on_fatal(fatal.append)
    pool.start()
    speech = speech_with_pauses(((0.3, 1.5), (0.5, 1.5)), seed=5)
    try:
        a = pool.open_stream("a", source="file", codec="pcm_16", sample_rate=16000, channels=1)
        b = pool.open_stream("b", source="file", codec="pcm_16", sample_rate=16000, channels=1)
        assert (pool.worker_of("a"), pool.worker_of("b")) == (0, 1)
        push(a, speech[:16000])
        push(b, speech[:16000])
        events.wait(lambda: opened(events, "a") == 1 and opened(events, "b") == 1, 10, "streams open")

        # A shard that dies: restarted, its stream told and reopened; the other slot untouched.
        ThreadLink.made[0].die("actor died (test)")
        events.wait(lambda: opened(events, "a") == 2, 20, "stream a reopened on the new link")
        assert len(ThreadLink.made) == 3 and pool.stats()["workers"]["restarts"] == 1
        (lost,) = [e for e in events.of("a") if e["type"] == "error"]
        assert lost["code"] == WORKER_LOST and "shard 0 (thread 0) died (actor died (test))" in lost["message"]
        assert "reopens on the restarted shard" in lost["message"] and closed(events, "a")[0]["reason"] == \
            "error: worker lost"
        assert not fatal and pool.fatal is None

        # The backend gone (a Ray cluster lost): no restart, the stream closed, one fatal line, once.
        ThreadLink.made[2].die("cluster lost (test)", gone="lost the Ray cluster (ConnectionError: test)")
        events.wait(lambda: len(closed(events, "a")) == 2, 10, "stream a closed for good")
        events.wait(lambda: bool(fatal), 10, "the fatal callback")
        assert fatal == ["lost the Ray cluster (ConnectionError: test)"] and pool.fatal == fatal[0]
        errors = [e for e in events.of("a") if e["type"] == "error"]
        assert len(errors) == 2 and "lost (lost the Ray cluster" in errors[1]["message"]
        assert errors[1]["message"].endswith("the stream is closed")
        assert pool.worker_of("a") is None and len(ThreadLink.made) == 3  # not restarted
        assert pool.stats()["drops"]["shards_given_up"] == 1 and pool.stats()["workers"]["restarts"] == 1
        assert a.closed

        # Slot 1's stream never noticed: it finishes with its finals.
        push(b, speech[16000:])
        b.close("end of file")
        events.wait(lambda: bool(closed(events, "b")), 30, "stream b closed")
    finally:
        pool.stop(drain=False, timeout=5.0)
    b_events = events.of("b")
    assert not [e for e in b_events if e["type"] == "error"]
    assert [e for e in b_events if e["type"] == "emotion" and e["kind"] == "final"]
    assert closed(events, "b")[0]["reason"] != "error: worker lost"
    assert pool.stats()["drops"]["worker_lost"] == 2
