"""Network capacity: how many real-time 8 kHz PCMU RTP streams and WebSocket ingest streams this machine sustains.

    .venv/bin/python benchmarks/bench_network.py --quick          # a smoke run, about a minute
    .venv/bin/python benchmarks/bench_network.py                  # the full ramp, a few minutes
    .venv/bin/python benchmarks/bench_network.py --rtp-steps 100,200,300,400 --ws-steps 0

The monitor runs in this process exactly as ``serstream listen --rtp`` /
``serstream serve`` run it (Monitor, RtpSource, MonitorServer with the ingest
handler). A *separate sender process* plays N calls at once on loopback:

* RTP: N SSRCs, one 20 ms PCMU packet (160 bytes) per stream every 20 ms,
  speech-like audio at conversational density (``serstream.bench.speech_like``:
  utterances of 1-8 s, about 75 % voiced; each stream at its own offset);
* WebSocket: N ``/ingest`` clients, one 20 ms frame of 16 kHz s16le (640
  bytes) per stream every 20 ms, each reading its own events back.

The sender paces by a monotonic clock; when it falls more than 100 ms behind
(the machine is overloaded) it skips the missed packets and counts them as
*sender drops* (RTP: with the sequence numbers advanced, as a lossy network
would). Each step is judged by :mod:`serstream.core.capacity`, the one
definition ``serstream bench`` uses too: **sustained (every partial)** when
nothing was lost (no sender drops, RTP jitter-buffer ``lost`` + ``late``
beyond the sender's drops, kernel drops, audio dropped by a stream ring,
events dropped for a slow client), no partial expired or was dropped, the p95
latency of the partial estimates (the monitor's own ``latency_ms``: from the
audio completing the window reaching the monitor to the event) is under
250 ms and the p95 end-of-speech-to-final latency under 500 ms; **with
partials thinned** when the same holds but partials may be thinned (expired,
superseded). RTP finals that the idle-timeout close flushes after the sender
stopped wait for that timeout by design (the sender never says a call ended),
so only events while the sender runs count there.

The ramp stops at the first step that fails even the thinned reading. With no ``--model``
and no shipped model, the small factory model of the tests is used (then the
figures measure the network and pipeline path more than the model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serstream.core.capacity import (  # noqa: E402 - after the sys.path line above
    FINAL_P95_LIMIT_MS,
    PARTIAL_P95_LIMIT_MS,
    StepOutcome,
    Verdict,
    capacity,
    judge,
)

PACKET_S = 0.020
BEHIND_LIMIT_S = 0.100


@dataclass
class Step:
    """One step of a ramp."""

    kind: str
    streams: int
    seconds: float
    sent: int = 0
    sender_dropped: int = 0
    received_lost: int = 0  # RTP: lost + late in the jitter buffers, beyond the sender's drops
    kernel_drops: int = 0
    audio_dropped: int = 0
    events_dropped: int = 0
    emotion_events: int = 0
    partials: int = 0
    finals: int = 0
    p50_ms: float | None = None  # partials
    p95_ms: float | None = None  # partials
    final_p95_ms: float | None = None
    partials_expired: int = 0
    partials_dropped: int = 0
    partials_superseded: int = 0
    finals_dropped: int = 0
    cpu_percent: float = 0.0
    sustained: bool = False  # every partial
    thinned: bool = False  # with partials thinned
    why: str = ""


# --------------------------------------------------------------------------- sender process


def _speech(seconds: float, rate: int) -> np.ndarray:
    from serstream.bench import speech_like

    return speech_like(seconds, seed=3, rate=rate)


def _pace(started: float, tick: int) -> int:
    """Sleep until ``tick`` is due; return how many ticks to skip when far behind."""
    due = started + tick * PACKET_S
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
        return 0
    behind = -delay
    return int(behind // PACKET_S) if behind > BEHIND_LIMIT_S else 0


def rtp_sender(port: int, streams: int, seconds: float, result: Any) -> None:
    """Send ``streams`` PCMU calls to 127.0.0.1:``port`` in real time; report counts on ``result``."""
    from serstream.rtp import encode_ulaw

    payload = encode_ulaw(_speech(20.0, 8000))
    step = 160
    n_chunks = len(payload) // step
    header = struct.Struct("!BBHII")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    target = ("127.0.0.1", port)
    ticks = int(seconds / PACKET_S)
    offsets = [(i * 37) % n_chunks for i in range(streams)]
    sent = dropped = 0
    started = time.monotonic()
    tick = 0
    while tick < ticks:
        skip = _pace(started, tick)
        if skip:
            skip = min(skip, ticks - tick)
            dropped += skip * streams
            tick += skip
            continue
        for s in range(streams):
            chunk = (offsets[s] + tick) % n_chunks
            packet = header.pack(0x80, 0, tick & 0xFFFF, (tick * step) & 0xFFFFFFFF, 0x10000 + s)
            try:
                sock.sendto(packet + payload[chunk * step:(chunk + 1) * step], target)
                sent += 1
            except OSError:
                dropped += 1
        tick += 1
    sock.close()
    result.send({"sent": sent, "dropped": dropped})


def ws_sender(url: str, streams: int, seconds: float, result: Any) -> None:
    """Run ``streams`` /ingest clients sending 16 kHz s16le in real time; report counts on ``result``."""
    from websockets.asyncio.client import connect

    audio = (np.clip(_speech(20.0, 16000), -1, 1) * 32767).astype("<i2").tobytes()
    frame = 640
    n_frames = len(audio) // frame
    counts = {"sent": 0, "dropped": 0, "events": 0}

    async def one(index: int, start_at: float) -> None:
        async with connect(url, compression=None, max_size=None) as ws:
            hello = {"type": "hello", "stream": f"bench-{index}", "sample_rate": 16000, "format": "s16le"}
            await ws.send(json.dumps(hello))
            await ws.recv()

            async def drain() -> None:
                async for _ in ws:
                    counts["events"] += 1

            reader = asyncio.create_task(drain())
            ticks = int(seconds / PACKET_S)
            tick = 0
            offset = (index * 37) % n_frames
            while tick < ticks:
                due = start_at + tick * PACKET_S
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif -delay > BEHIND_LIMIT_S:
                    skip = min(int(-delay // PACKET_S), ticks - tick)
                    counts["dropped"] += skip
                    tick += skip
                    continue
                chunk = (offset + tick) % n_frames
                await ws.send(audio[chunk * frame:(chunk + 1) * frame])
                counts["sent"] += 1
                tick += 1
            await ws.send(json.dumps({"type": "end"}))
            try:
                await asyncio.wait_for(reader, 15)
            except TimeoutError:
                reader.cancel()

    async def main() -> None:
        start_at = time.monotonic() + 0.5 + streams * 0.004
        await asyncio.gather(*(one(i, start_at) for i in range(streams)))

    asyncio.run(main())
    result.send(counts)


# --------------------------------------------------------------------------- monitor side


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _load_model(path: str | None, threads: int | None, cudnn_search: str | None = None) -> Any:
    from serstream.inference.session import EmotionModel
    from serstream.models import ModelNotFoundError, resolve_model_path

    try:
        resolved = resolve_model_path(path)
    except ModelNotFoundError as exc:
        if path is not None:
            raise SystemExit(f"bench_network: {exc}") from None
        from tests.modelfactory import build_test_model

        resolved = build_test_model(Path(tempfile.mkdtemp(prefix="bench-net-")) / "factory.onnx")
        print(f"bench_network: no shipped model ({exc}); using the tests' factory model", file=sys.stderr)
    from serstream.inference.session import CUDA_PROVIDER_OPTIONS

    cuda_options = dict(CUDA_PROVIDER_OPTIONS)
    if cudnn_search:
        cuda_options["cudnn_conv_algo_search"] = cudnn_search.upper()
    return EmotionModel.load(resolved, device="auto", threads=threads, cuda_options=cuda_options)


#: ``--workers``: 1 is the in-process Monitor; more runs the pipelines in that many processes (WorkerPool).
_WORKERS = 1


def _make_monitor(model: Any, config: Any, sink: Any) -> Any:
    """The monitor ``serstream serve --workers N`` builds for the same N."""
    from serstream.monitor import Monitor

    if _WORKERS > 1:
        from serstream.workers.pool import WorkerPool

        return WorkerPool(model, config, sink, workers=_WORKERS)
    return Monitor(model, config, sink)


def _audio_dropped(drops: dict[str, Any]) -> int:
    """Audio lost in a stream ring, plus (``--workers``) on the way to a worker."""
    return int(drops.get("audio_samples", 0)) + int(drops.get("worker_audio_samples", 0))


class _Collector:
    """Sink part that keeps each emotion event's latency by kind until ``until`` (light: monitor threads)."""

    def __init__(self) -> None:
        self.partial: list[float] = []
        self.final: list[float] = []
        self.events = 0
        self.until = float("inf")  # monotonic time after which events are counted but not timed

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "emotion":
            self.events += 1
            if time.monotonic() < self.until:
                (self.final if event.get("kind") == "final" else self.partial).append(float(event["latency_ms"]))


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _fill(step: Step, collected: _Collector, drops: dict[str, Any]) -> Step:
    """The monitor's figures into ``step``, then the verdict of serstream/core/capacity.py."""
    step.emotion_events = collected.events
    step.partials, step.finals = len(collected.partial), len(collected.final)
    step.p50_ms, step.p95_ms = _pct(collected.partial, 50), _pct(collected.partial, 95)
    step.final_p95_ms = _pct(collected.final, 95)
    step.audio_dropped = _audio_dropped(drops)
    step.events_dropped = int(drops.get("events_dropped", 0))
    step.partials_expired = int(drops.get("partials_expired", 0))
    step.partials_dropped = int(drops.get("partials_dropped", 0))
    step.partials_superseded = int(drops.get("partials_superseded", 0))
    step.finals_dropped = int(drops.get("finals_dropped", 0))
    verdict = judge(_outcome(step))
    step.sustained, step.thinned = verdict.sustained, verdict.thinned
    step.why = "; ".join(verdict.why)
    return step


def _outcome(step: Step) -> StepOutcome:
    return StepOutcome(
        streams=step.streams, audio_dropped=step.audio_dropped, partials_expired=step.partials_expired,
        partials_dropped=step.partials_dropped, finals_dropped=step.finals_dropped,
        partials_superseded=step.partials_superseded, partials=step.partials, finals=step.finals,
        partial_p95_ms=step.p95_ms, final_p95_ms=step.final_p95_ms,
        losses={"sender_drops": step.sender_dropped, "received_lost": step.received_lost,
                "kernel_drops": step.kernel_drops, "events_dropped": step.events_dropped,
                "nothing_sent": 0 if step.sent > 0 else 1},
    )


def run_rtp_step(model: Any, streams: int, seconds: float) -> Step:
    from serstream.monitor import MonitorConfig
    from serstream.sources.rtp import RtpSource, RtpSourceConfig

    collected = _Collector()
    monitor = _make_monitor(model, MonitorConfig(max_streams=streams + 16, stats_interval_s=3600), collected)
    monitor.start()
    source = RtpSource(monitor, "127.0.0.1", 0, None,
                       RtpSourceConfig(idle_timeout_s=1.0, max_streams=streams + 16, rtcp=False))
    source.start()
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    cpu0 = _cpu_seconds()
    wall0 = time.monotonic()
    sender = ctx.Process(target=rtp_sender, args=(source.port, streams, seconds, send), daemon=True)
    sender.start()
    counts = receive.recv() if receive.poll(seconds + 60) else {"sent": 0, "dropped": 0}
    # Latency of the live phase: the finals that the idle-timeout close (1 s after the last
    # packet) flushes wait for that timeout by design (the sender never says a call ended),
    # so events from half the timeout after the last packet on are left out of the latencies.
    collected.until = time.monotonic() + 0.5
    sender.join(10)
    time.sleep(0.3)  # estimates of the last audio
    cpu = (_cpu_seconds() - cpu0) / max(1e-6, time.monotonic() - wall0) * 100
    time.sleep(1.5)  # idle timeout: every stream closes and flushes
    monitor.wait_idle(timeout=30)
    source.stop()
    stats = source.stats()
    totals = stats["totals"]
    drops = monitor.stats()["drops"]
    monitor.stop(drain=False)
    step = Step("rtp", streams, seconds, sent=counts["sent"], sender_dropped=counts["dropped"],
                kernel_drops=stats["kernel_drops"], cpu_percent=cpu)
    # Sender-skipped packets leave sequence gaps, which the jitter buffers count as lost too.
    step.received_lost = max(0, totals["lost"] + totals["late"] - counts["dropped"])
    return _fill(step, collected, drops)


def run_ws_step(model: Any, streams: int, seconds: float) -> Step:
    from serstream.access import LimitsConfig
    from serstream.metrics import scrape
    from serstream.monitor import MonitorConfig
    from serstream.server import EventBus, MonitorServer
    from serstream.sources.ingest import make_ingest_handler

    ready = threading.Event()
    box: dict[str, Any] = {}
    stop_flag: dict[str, Any] = {}
    collected = _Collector()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        bus = EventBus()

        def sink(event: dict[str, Any]) -> None:
            collected(event)
            bus.publish_threadsafe(loop, event)

        monitor = _make_monitor(model, MonitorConfig(max_streams=streams + 16, stats_interval_s=3600), sink)
        monitor.set_bus_drop_counter(lambda: bus.events_dropped)
        handler = make_ingest_handler(monitor, bus=bus, token=None, max_streams=streams + 16)
        # Every client comes from 127.0.0.1: lift the per-address caps (docs/security.md) to the ramp.
        caps = LimitsConfig(max_ingest=streams + 16, max_ingest_per_address=streams + 16,
                            max_handshakes_per_address=streams + 16)
        server = MonitorServer(bus, "127.0.0.1", 0, health=monitor.health,
                               metrics=lambda: scrape(monitor), ingest_handler=handler,
                               limits=caps)
        await server.start()
        monitor.start()
        stop = asyncio.Event()
        box.update(monitor=monitor, port=server.port, handler=handler)
        stop_flag.update(loop=loop, event=stop)
        ready.set()
        await stop.wait()
        await asyncio.to_thread(monitor.wait_idle, 30)
        box["stats"] = monitor.stats()
        await asyncio.to_thread(monitor.stop, False)
        await server.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    ready.wait(30)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    cpu0 = _cpu_seconds()
    wall0 = time.monotonic()
    url = f"ws://127.0.0.1:{box['port']}/ingest"
    sender = ctx.Process(target=ws_sender, args=(url, streams, seconds, send), daemon=True)
    sender.start()
    counts = receive.recv() if receive.poll(seconds + 90) else {"sent": 0, "dropped": 0}
    sender.join(10)
    cpu = (_cpu_seconds() - cpu0) / max(1e-6, time.monotonic() - wall0) * 100
    stop_flag["loop"].call_soon_threadsafe(stop_flag["event"].set)
    thread.join(60)
    stats = box.get("stats") or {"latency_ms": {}, "drops": {}}
    step = Step("websocket", streams, seconds, sent=counts["sent"], sender_dropped=counts["dropped"], cpu_percent=cpu)
    return _fill(step, collected, stats["drops"])


def ramp(kind: str, model: Any, steps: list[int], seconds: float) -> list[Step]:
    runner = run_rtp_step if kind == "rtp" else run_ws_step
    done: list[Step] = []
    for n in steps:
        step = runner(model, n, seconds)
        done.append(step)
        print(_row(step), flush=True)
        if not step.thinned:
            break
    return done


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


HEADER = (f"{'kind':<10} {'streams':>7} {'sent':>8} {'sender drop':>11} {'lost':>5} {'kernel drop':>11} "
          f"{'audio drop':>10} {'emotions':>8} {'p50 ms':>7} {'p95 ms':>7} {'final p95':>9} {'expired':>7} "
          f"{'cpu %':>6}  every partial / thinned")


def _row(s: Step) -> str:
    return (f"{s.kind:<10} {s.streams:>7} {s.sent:>8} {s.sender_dropped:>11} {s.received_lost:>5} "
            f"{s.kernel_drops:>11} {s.audio_dropped:>10} {s.emotion_events:>8} {_fmt(s.p50_ms):>7} "
            f"{_fmt(s.p95_ms):>7} {_fmt(s.final_p95_ms):>9} {s.partials_expired:>7} {s.cpu_percent:>6.0f}  "
            f"{'yes' if s.sustained else 'NO'} / {'yes' if s.thinned else 'NO'}" + (f"   ({s.why})" if s.why else ""))


def _workers(text: str) -> int:
    """``--workers N|auto``, read as ``serstream serve`` reads it (auto: one per core)."""
    from serstream.workers.plan import parse_workers

    try:
        return parse_workers(text, os.cpu_count())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--workers ")) from None


def _steps(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short steps and a small ramp (about a minute)")
    parser.add_argument("--model", default=None, help="ONNX model (default: the shipped one, else the factory model)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rtp-steps", default=None, help="comma-separated RTP stream counts (0: skip)")
    parser.add_argument("--ws-steps", default=None, help="comma-separated WebSocket stream counts (0: skip)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per step")
    parser.add_argument("--json", action="store_true", help="print the steps as JSON as well")
    parser.add_argument("--cudnn-search", choices=("exhaustive", "heuristic", "default"), default=None,
                        help="on CUDA: the cuDNN algorithm search (default: the monitor's, session.py)")
    parser.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                        help="run the pipelines in N worker processes, as `serve --workers N` (default 1); "
                        "the CPU column then counts this process only")
    args = parser.parse_args(argv)
    global _WORKERS
    _WORKERS = max(1, args.workers)
    seconds = args.seconds or (6.0 if args.quick else 15.0)
    default_rtp_steps = [25, 100] if args.quick else [25, 50, 75, 100, 125, 150, 200, 300, 400, 500]
    rtp_steps = _steps(args.rtp_steps) if args.rtp_steps else default_rtp_steps
    default_ws_steps = [10, 40] if args.quick else [25, 50, 75, 100, 125, 150, 200, 300]
    ws_steps = _steps(args.ws_steps) if args.ws_steps else default_ws_steps
    model = _load_model(args.model, args.threads, args.cudnn_search)
    from serstream.inference.session import describe_device

    gpu_setup = ""
    if model.device == "cuda":
        search = model.session.get_provider_options().get("CUDAExecutionProvider", {}).get("cudnn_conv_algo_search")
        gpu_setup = f"cuDNN search {search}; "
    print(f"model {model.info.version} on {describe_device(model)} ({model.path}); {os.cpu_count()} CPU cores; "
          f"{_WORKERS} worker process(es); {gpu_setup}"
          f"{seconds:g} s per step; capacity rule (serstream/core/capacity.py): nothing lost, partial p95 < "
          f"{PARTIAL_P95_LIMIT_MS:.0f} ms, final p95 < {FINAL_P95_LIMIT_MS:.0f} ms, and for 'every partial' "
          "no partial expired")
    print(HEADER, flush=True)
    steps = ramp("rtp", model, rtp_steps, seconds) + ramp("websocket", model, ws_steps, seconds)
    for kind in ("rtp", "websocket"):
        tried = [s for s in steps if s.kind == kind]
        if tried:
            figures = capacity([Verdict(s.streams, s.sustained, s.thinned, (), ()) for s in tried])
            print(f"{kind}: sustained (every partial) {figures.every_partial} streams"
                  + (" (ramp ended before a limit was found)" if figures.every_partial_open else "")
                  + f"; with partials thinned {figures.partials_thinned} streams"
                  + (" (ramp ended before a limit was found)" if figures.thinned_open else ""))
    if args.json:
        print(json.dumps([asdict(s) for s in steps], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
