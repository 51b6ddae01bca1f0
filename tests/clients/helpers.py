"""Helpers of the client tests: a monitor that is (re)started until it serves."""

from __future__ import annotations

import time

from tests.e2e.helpers import Background

__all__ = ["start_monitor"]


def start_monitor(args: list[str], attempts: int = 5, env: dict[str, str] | None = None,
                  ready: str = "dashboard http") -> Background:
    """``serstream`` with ``args``, waited for until it serves; retried while its port is still taken.

    A monitor restarted on the port of one just killed may find the port
    busy for a moment (the machine is shared; the kernel may still hold it).
    """
    for attempt in range(attempts):
        monitor = Background(args, env=env)
        try:
            monitor.wait_for(lambda: monitor.stderr_has(ready), 60, "the monitor to start")  # noqa: B023 (called now)
            return monitor
        except AssertionError:
            monitor.kill()
            if attempt == attempts - 1 or not monitor.stderr_has("already in use"):
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")
