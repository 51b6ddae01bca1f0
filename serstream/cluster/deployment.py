"""The inference replica: a Ray Serve deployment that runs the emotion model on single windows, batched.

Each replica loads the model from the bytes the monitor sent with the
deployment (the model file and its metadata sidecar, written to a private
temporary folder on the replica's node), so every replica runs exactly the
model the monitor resolved (``--model``, ``$SERSTREAM_MODEL`` or the shipped
default) and worker nodes need serstream installed but no model file.

Requests are single windows (:class:`~serstream.cluster.wire.WindowRequest`,
audio plus the stream's state rows); ``@serve.batch`` gathers the windows
that arrive together, from every monitor, into one padded batch. A replica
keeps no per-stream state, so any replica serves any window.

A batch the model fails on is run again one window at a time, as the
monitor's own inference worker does, so one bad window does not take the
other windows of its batch (other streams, other monitors) with it; a window
that still fails comes back as a result with ``error`` set (one line), never
as an exception for the whole batch.

Import this module only where Ray is installed (``pip install "serstream[ray]"``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from serstream.cluster.wire import WindowRequest, WindowResult, result_rows
from serstream.errors import one_line
from serstream.inference.session import EmotionModel, pad_batch

__all__ = ["InferenceDeployment", "DEFAULT_MAX_BATCH", "DEFAULT_BATCH_WAIT_S"]

#: Windows per replica batch (``--max-batch``): the monitor's CPU default (8) times two, since a
#: replica batches several monitors' windows; on CPU a window costs the same at any batch size.
DEFAULT_MAX_BATCH = 16
#: How long a replica waits for more windows before running what it has (seconds).
DEFAULT_BATCH_WAIT_S = 0.005


@serve.deployment(name="SerstreamInference")
class InferenceDeployment:
    """One replica: the model, loaded once; windows in, one result per window out."""

    def __init__(
        self,
        model_name: str,
        model_bytes: bytes,
        sidecar_bytes: bytes | None,
        device: str = "auto",
        threads: int = 1,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
    ) -> None:
        folder = Path(tempfile.mkdtemp(prefix="serstream-replica-"))
        path = folder / Path(model_name).name
        path.write_bytes(model_bytes)
        if sidecar_bytes is not None:
            path.with_suffix(".json").write_bytes(sidecar_bytes)
        self.model = EmotionModel.load(path, device=device, threads=threads)
        self.infer_window.set_max_batch_size(int(max_batch))
        self.infer_window.set_batch_wait_timeout_s(float(batch_wait_s))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()

    def describe(self) -> dict[str, Any]:
        """What the monitor needs to drive its pipeline: the model's metadata and where it runs."""
        return {"info": self.model.info, "device": self.model.device, "replica": self.replica, "node": self.node}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def infer_window(self, requests: list[WindowRequest]) -> list[WindowResult]:
        """Run the windows that arrived together as one batch; a failing batch is split (see module doc)."""
        try:
            return self._run(requests)
        except Exception as exc:  # noqa: BLE001 - find the window(s) that fail; the others still get results
            if len(requests) == 1:
                return [self._failed(exc)]
        out: list[WindowResult] = []
        for request in requests:
            try:
                out.extend(self._run([request]))
            except Exception as exc:  # noqa: BLE001 - the message is the result
                out.append(self._failed(exc))
        return out

    def _run(self, requests: list[WindowRequest]) -> list[WindowResult]:
        audio, lengths = pad_batch([r.audio for r in requests])
        state = {spec.name: [r.state.get(spec.name) for r in requests] for spec in self.model.state_inputs}
        output = self.model.infer(audio, lengths, state or None)
        return result_rows(output, self.replica, self.node)

    def _failed(self, exc: Exception) -> WindowResult:
        return WindowResult(probs=_EMPTY, avd=_EMPTY, gender_probs=_EMPTY, replica=self.replica, node=self.node,
                            error=f"{type(exc).__name__}: {one_line(exc)}")


_EMPTY = np.zeros(0, np.float32)
