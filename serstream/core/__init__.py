"""Pure state machines of the monitor: no sockets, threads or clocks inside."""
