"""``serstream cluster``: the normal monitor (sources, server, one /events) with its inference on Ray.

The command takes every ``listen`` option (cli.py copies them) plus the
cluster options below. Sources as ``listen`` has them when any is named
(``--file``, ``--rtp``, ``--device``); with none it serves like ``serve``
(``/ingest`` and ``/events`` only), since a cluster's monitor rarely has a
microphone. The model is resolved and validated here (``--model``,
``$SERSTREAM_MODEL``, the shipped default), then sent to the replicas.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from serstream.cluster.connect import DEFAULT_APP, ClusterConfig, deploy
from serstream.errors import ClusterError, UserError, one_line

__all__ = ["add_cluster_arguments", "config_from_args", "run_cluster"]


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The cluster options of ``serstream cluster`` (the ``listen`` ones are added by cli.py)."""
    group = parser.add_argument_group("cluster (Ray Serve inference; docs/scale-out.md)")
    group.add_argument("--address", required=True, metavar="ADDRESS",
                       help="the Ray cluster: ray://HEAD:10001 (Ray Client), HEAD:6379 (join as a driver), "
                       "auto (the node `ray start` runs here) or local (start Ray on this machine)")
    group.add_argument("--replicas", type=int, default=1, metavar="N",
                       help="inference replicas (default 1); with --max-replicas, the minimum")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N",
                       help="autoscale between --replicas and N by ongoing requests per replica")
    group.add_argument("--target-ongoing", type=float, default=8.0, metavar="N",
                       help="autoscaling target: windows in flight per replica (default 8)")
    group.add_argument("--num-cpus", type=float, default=1.0, metavar="X", help="CPUs per replica (default 1)")
    group.add_argument("--num-gpus", type=float, default=0.0, metavar="X",
                       help="GPUs per replica (default 0; fractions share a GPU, e.g. 0.25)")
    group.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="windows per replica batch, gathered from every monitor (default 16)")
    group.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                       help="how long a replica waits for more windows before it runs a batch (default 5)")
    group.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a batch not answered by then fails (counted, error event; default 10)")
    group.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="give up on an unreachable head after SECONDS (default 5)")
    group.add_argument("--deploy-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="give up when the replicas are not ready after SECONDS (default 120)")
    group.add_argument("--app", default=DEFAULT_APP, metavar="NAME",
                       help=f"Serve application name on the cluster (default {DEFAULT_APP})")
    group.add_argument("--keep-deployment", action="store_true",
                       help="leave the replicas running on exit (default: the deployment is deleted)")
    group.add_argument("--shards", type=int, default=0, metavar="N",
                       help="run the streams' pipelines in N Ray actors spread over the nodes (default 0: "
                       "in this process); this process keeps the sockets and the one /events")
    group.add_argument("--shard-cpus", type=float, default=1.0, metavar="X",
                       help="CPUs reserved per shard actor (default 1)")


def config_from_args(args: argparse.Namespace, threads: int | None) -> ClusterConfig:
    """The :class:`ClusterConfig` of the options; UserError (one line) on a bad value."""
    try:
        return ClusterConfig(
            address=args.address, replicas=args.replicas, max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
            device=args.device_backend, threads=threads, max_batch=args.max_batch,
            batch_wait_s=args.batch_wait_ms / 1000.0, request_timeout_s=args.request_timeout,
            connect_timeout_s=args.connect_timeout, deploy_timeout_s=args.deploy_timeout,
            app=args.app, keep=bool(args.keep_deployment),
        )
    except ValueError as exc:
        raise UserError(one_line(exc, limit=None)) from None


def run_cluster(
    args: argparse.Namespace,
    load_model: Callable[..., Any],
    run_monitor: Callable[[argparse.Namespace, Any, bool], int],
) -> int:
    """Validate the model here, deploy it, run the monitor on the cluster backend, clean up."""
    if args.duration is not None and args.duration < 0:
        raise UserError("--duration must be >= 0")
    if args.exit_when_done and not args.file:
        raise UserError("--exit-when-done needs at least one --file")
    config = config_from_args(args, args.threads)
    shards = int(getattr(args, "shards", 0) or 0)
    check_shard_args(shards, float(getattr(args, "shard_cpus", 1.0)), int(getattr(args, "workers", 1) or 1))
    # Files are checked before the cluster is touched: a typo costs a second, not a deployment.
    from serstream.errors import SourceError
    from serstream.sources.file import open_audio_file

    for path in args.file:
        try:
            open_audio_file(path).close()
        except SourceError as exc:
            raise UserError(one_line(exc, limit=None)) from None
    # Load once on CPU here: a broken model is one line before any cluster is touched.
    local = load_model(args.model, "cpu", 1)
    try:
        session = deploy(local.path, config)
    except ClusterError as exc:
        raise UserError(one_line(exc, limit=None)) from None
    del local
    with_sources = bool(args.file or args.rtp or args.device is not None)
    try:
        if shards:
            try:
                check_room_for_shards(config, shards, float(args.shard_cpus))
            except ClusterError as exc:
                raise UserError(one_line(exc, limit=None)) from None
        return run_monitor(args, session.backend, with_sources)
    except ClusterError as exc:
        # The cluster went away under the shards: nothing there to delete; one line, exit 2.
        session.lost = True
        raise UserError(one_line(exc, limit=None)) from None
    finally:
        session.close()


def check_shard_args(shards: int, shard_cpus: float, workers: int) -> None:
    """UserError (one line) on shard options that cannot work."""
    if shards < 0 or shards > 256:
        raise UserError(f"--shards must be 0 to 256, got {shards}")
    if not (shard_cpus >= 0 and shard_cpus < float("inf")):
        raise UserError(f"--shard-cpus must be a number >= 0, got {shard_cpus}")
    if shards and workers > 1:
        raise UserError("--shards and --workers both split the pipelines: use one (--shards on a cluster)")


def check_room_for_shards(config: ClusterConfig, shards: int, shard_cpus: float) -> None:
    """ClusterError when the cluster's CPUs cannot hold the replicas and the shards together."""
    import ray

    have = float(ray.cluster_resources().get("CPU", 0.0))
    need = config.num_cpus * config.replicas + shard_cpus * shards
    if need > have + 1e-9:
        raise ClusterError(f"{config.replicas} replica(s) x {config.num_cpus:g} CPU and {shards} shard(s) x "
                           f"{shard_cpus:g} CPU need {need:g} CPUs; the cluster has {have:g}")
