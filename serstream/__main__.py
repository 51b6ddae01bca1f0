"""``python -m serstream``: the same as the ``serstream`` command."""

from __future__ import annotations

import sys

from serstream.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
