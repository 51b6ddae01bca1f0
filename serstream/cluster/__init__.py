"""Inference on a Ray cluster (``pip install "serstream[ray]"``; ``serstream cluster``; docs/scale-out.md).

* :mod:`~serstream.cluster.wire` (pure): one window per request, audio plus
  the stream's state rows, so replicas are stateless;
* :mod:`~serstream.cluster.policy` (pure): resend a window once when its
  replica died, and a breaker so a cluster that went away fails fast;
* :mod:`~serstream.cluster.deployment`: the Ray Serve deployment
  (``@serve.batch`` over single windows, CPU or GPU replicas);
* :mod:`~serstream.cluster.backend`: :class:`ServeBackend`, the monitor's
  :class:`~serstream.inference.worker.InferenceBackend` over a Serve handle;
* :mod:`~serstream.cluster.connect`: connect or start Ray, deploy, clean up;
* :mod:`~serstream.cluster.command`: the ``serstream cluster`` options and run.

Only ``deployment`` imports Ray at import time; the rest load without it
(``connect`` says in one line when it is missing).
"""
