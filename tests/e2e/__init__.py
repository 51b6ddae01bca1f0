"""End-to-end tests: the real command in a subprocess, real sockets, real audio devices."""
