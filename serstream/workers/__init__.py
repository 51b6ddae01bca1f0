"""``--workers N``: the per-stream pipelines in N processes behind one Monitor-like facade.

``plan`` and ``merge`` are pure (the assignment rule, the restart rules, batch
merging, stats sums); ``pool`` (main process) and ``child`` (each worker) do
the I/O. See docs/scale-out.md, "One machine: --workers N".
"""

from __future__ import annotations

from serstream.workers.plan import assign_worker, parse_workers

__all__ = ["assign_worker", "parse_workers"]
