"""Pure state machines of the monitor: no sockets, threads or clocks inside.

Import the submodules directly (``from serstream.core.vad import VadSegmenter``);
this package does not re-export them, so importing one does not load the others.
"""

__all__ = [
    "adaptation",
    "audio",
    "batcher",
    "resample",
    "ringbuffer",
    "scheduler",
    "smoother",
    "stats",
    "vad",
]
