"""Connect to (or start) a Ray cluster, deploy the inference replicas, hand back a :class:`ServeBackend`.

``address`` forms (``serstream cluster --address``):

* ``local``: start a Ray instance on this machine (one node; to try it out);
* ``auto``: the Ray node already running on this machine (``ray start``);
* ``HOST:PORT``: a head's GCS address (``ray start --head`` prints it, port 6379),
  this process joins as a driver (it needs to reach every node);
* ``ray://HOST:PORT``: Ray Client to a head's client server (port 10001).

For the two remote forms the port is tried first with a plain TCP connect
(``connect_timeout_s``), so an unreachable head is one line in a few seconds,
not Ray's own retry loop (a port that accepts connections but is not Ray's
is left to Ray: Ray Client gives up after about 45 s). Everything else that
can go wrong (Ray missing, the deployment not starting, not enough CPUs or
GPUs for the replicas) is a :class:`~serstream.errors.ClusterError` with one line; :func:`deploy` never
waits longer than ``deploy_timeout_s`` for the replicas.

Nothing listens for the monitor here: Serve's HTTP proxy is not started
(``proxy_location="Disabled"``); the monitor talks to the replicas through a
``DeploymentHandle``. Ray's own ports are Ray's: keep them on a private
network (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serstream.cluster.backend import ServeBackend
from serstream.cluster.keeper import report_logs_dir
from serstream.cluster.policy import RequestPolicy
from serstream.errors import ClusterError, one_line

__all__ = ["ClusterConfig", "ClusterSession", "parse_address", "deploy", "deployment_options"]

log = logging.getLogger(__name__)

#: The Serve application's name on the cluster (``--app``).
DEFAULT_APP = "serstream"


@dataclass(frozen=True)
class ClusterConfig:
    """Where the cluster is and how the inference deployment looks."""

    address: str = "local"
    #: Replicas to start with; with ``max_replicas`` above it, Serve autoscales between the two.
    replicas: int = 1
    max_replicas: int | None = None
    #: Autoscaling target: ongoing requests (windows) per replica.
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Where ONNX Runtime runs inside a replica ("auto": CUDA when the replica got a usable GPU).
    device: str = "auto"
    #: ONNX Runtime threads per replica (None: the replica's CPUs, at least 1).
    threads: int | None = None
    max_batch: int = 16
    batch_wait_s: float = 0.005
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    deploy_timeout_s: float = 120.0
    app: str = DEFAULT_APP
    #: Leave the deployment running on exit (another monitor may use it).
    keep: bool = False

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be >= --replicas ({self.replicas})")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("a replica needs --num-cpus or --num-gpus above 0")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("--device-backend cuda needs --num-gpus above 0 "
                             "(Ray hides GPUs from a replica without one)")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        for name in ("batch_wait_s", "target_ongoing_requests"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "connect_timeout_s", "deploy_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas


def parse_address(address: str) -> tuple[str, str | None, int | None]:
    """``(kind, host, port)``: kind is "local", "auto", "gcs" or "client"; ValueError (one line) otherwise."""
    text = address.strip()
    if text in ("local", "auto"):
        return text, None, None
    kind = "gcs"
    rest = text
    if text.startswith("ray://"):
        kind, rest = "client", text[len("ray://"):]
    elif "://" in text:
        raise ValueError(f"--address {address!r}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--address {address!r}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    return kind, host, int(port_text)


def check_reachable(host: str, port: int, timeout_s: float, address: str) -> None:
    """ClusterError (one line) when nothing accepts a TCP connection at ``host:port`` in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ClusterError(f"cannot reach the Ray head at {address}: {why} (is `ray start --head` running "
                           "there, and the port open?)") from None


class ClusterSession:
    """The connection and the deployment; :meth:`close` removes what :func:`deploy` made."""

    def __init__(self, config: ClusterConfig, started_ray: bool, backend: ServeBackend) -> None:
        self.config = config
        self.started_ray = started_ray
        self.backend = backend
        self._closed = False
        #: Set when the cluster went away under the monitor: nothing to delete there on close.
        self.lost = False

    def close(self) -> None:
        """Delete the deployment (unless ``keep``), disconnect; shut a ``local`` Ray down. Never raises."""
        if self._closed:
            return
        self._closed = True
        import ray
        from ray import serve

        # With the cluster gone (the breaker open) there is nothing to delete, and asking would only wait.
        if not self.config.keep and self.backend.answering and not self.lost:
            _quietly(lambda: serve.delete(self.config.app))
        if self.started_ray:
            _quietly(serve.shutdown)
        _quietly(ray.shutdown)


def deploy(model_path: Path, config: ClusterConfig) -> ClusterSession:
    """Connect, deploy ``model_path`` on ``config.replicas`` replicas, and return the session.

    ``model_path`` is resolved by the caller; the file and its ``.json``
    sidecar travel to the replicas. ClusterError (one line) on any failure;
    what was started before it is cleaned up.
    """
    kind, host, port = parse_address(config.address)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ClusterError('Ray is not installed here: pip install "serstream[ray]"') from None
    # Serve logs every deployment step at INFO on stderr, and with a head gone a warning every 0.2 s;
    # the monitor's own error events and counters say what matters.
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    if kind in ("gcs", "client"):
        assert host is not None and port is not None
        check_reachable(host, port, config.connect_timeout_s, config.address)
    try:
        model_bytes = model_path.read_bytes()
        sidecar = model_path.with_suffix(".json")
        sidecar_bytes = sidecar.read_bytes() if sidecar.is_file() else None
    except OSError as exc:
        raise ClusterError(f"cannot read the model {model_path}: {exc.strerror}") from None

    started_ray = False
    if not ray.is_initialized():
        _init_ray(ray, kind, config.address)
        started_ray = kind == "local"
        report_logs_dir()  # to the keeper process, if there is one (cluster/keeper.py)
        logging.getLogger("asyncio").addFilter(_ray_task_noise)
    try:
        _check_resources(ray, config)
        from serstream.cluster.deployment import InferenceDeployment

        options = deployment_options(config)
        threads = config.threads or max(1, int(config.num_cpus))
        # @serve.deployment made the class a Serve Deployment (`options`, `bind`); mypy sees the class.
        deployment: Any = InferenceDeployment
        app = deployment.options(**options).bind(
            model_path.name, model_bytes, sidecar_bytes, config.device, threads, config.max_batch,
            config.batch_wait_s,
        )
        serve.start(proxy_location="Disabled")
        handle = _run_with_timeout(lambda: serve.run(app, name=config.app, route_prefix=None),
                                   config.deploy_timeout_s, "the inference deployment did not become ready")
        described = _run_with_timeout(lambda: handle.describe.remote().result(timeout_s=config.request_timeout_s),
                                      config.request_timeout_s + 1, "no replica answered")
        backend = ServeBackend(
            handle, described["info"], str(described["device"]),
            f"{model_path} on {_where(config)}",
            timeout_s=config.request_timeout_s,
            policy=RequestPolicy(max_retries=1, threshold=1, cooldown_s=5.0),
        )
    except ClusterError:
        _cleanup(ray, serve, config, started_ray)
        raise
    except Exception as exc:  # noqa: BLE001 - Ray/Serve raise many types; all mean "could not deploy"
        _cleanup(ray, serve, config, started_ray)
        raise ClusterError(f"cannot deploy the inference on {config.address}: {_describe(exc)}") from None
    return ClusterSession(config, started_ray, backend)


def deployment_options(config: ClusterConfig) -> dict[str, Any]:
    """The ``Deployment.options(...)`` of the inference: resources, replicas or autoscaling, health checks."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # Room for a full batch of windows per replica (Serve's default is 5 ongoing requests).
        "max_ongoing_requests": max(2 * config.max_batch, 4),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas,
            "initial_replicas": config.replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.replicas
    return options


# ------------------------------------------------------------------ helpers


def _init_ray(ray: Any, kind: str, address: str) -> None:
    """``ray.init`` for the address kind, on this (the main) thread, as Ray wants for its signal handlers."""
    # Ray Client warns (a multi-line UserWarning) before its ConnectionError; the ClusterError says it.
    warnings.filterwarnings("ignore", message="Ray Client connection timed out")
    quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "namespace": "serstream"}
    try:
        if kind == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address="auto" if kind == "auto" else address, **quiet)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, grpc errors...
        hint = ""
        if kind != "local" and "RAY_AUTH_MODE" not in os.environ:
            # `ray start --head` turns token authentication on (Ray 2.60); a driver without the token
            # is refused with a bare "Failed to connect" after Ray's own 20 s of retries.
            hint = (" (a cluster started with `ray start` wants its token: RAY_AUTH_MODE=token, and the token in "
                    "RAY_AUTH_TOKEN or ~/.ray/auth_token; docs/scale-out.md)")
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {_describe(exc)}{hint}") from None


def _ray_task_noise(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's "Task exception was never retrieved" about Ray's own exceptions.

    Serve's router, on its loop in this process, polls each replica's queue length and never reads a
    poll that failed: with the cluster gone, one traceback per poll. The monitor reports the cluster's
    failures itself (inference_error events, one line at the end).
    """
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and type(exc).__module__.split(".")[0] == "ray")


def _check_resources(ray: Any, config: ClusterConfig) -> None:
    """ClusterError when the cluster could never place the replicas (instead of Serve waiting forever)."""
    total = ray.cluster_resources()
    for key, per in (("CPU", config.num_cpus), ("GPU", config.num_gpus)):
        have = float(total.get(key, 0.0))
        need = per * config.replicas
        if need > have + 1e-9:
            raise ClusterError(f"{config.replicas} replica(s) x {per:g} {key} need {need:g} {key}s; "
                               f"the cluster has {have:g}")


def _run_with_timeout(call: Any, timeout_s: float, what: str) -> Any:
    """``call()`` on a helper thread; ClusterError when it has not returned in ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="serstream-cluster-deploy", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ClusterError(f"{what} within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cleanup(ray: Any, serve: Any, config: ClusterConfig, started_ray: bool) -> None:
    if ray.is_initialized():
        _quietly(lambda: serve.delete(config.app))
        if started_ray:
            _quietly(serve.shutdown)
        _quietly(ray.shutdown)


def _quietly(call: Any) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - cleanup on the way out must not raise
        log.debug("cluster cleanup: %s", exc)


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    return f"{type(exc).__name__}: {one_line(exc, first_line=True)}"


def _where(config: ClusterConfig) -> str:
    scale = (f"{config.replicas}-{config.max_replicas} replicas (autoscaling)" if config.autoscaling
             else f"{config.replicas} replica(s)")
    gpu = f", {config.num_gpus:g} GPU" if config.num_gpus else ""
    return f"Ray {config.address}, {scale} x {config.num_cpus:g} CPU{gpu}"
