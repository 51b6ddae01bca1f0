"""What a non-editable install gets: the wheel must carry the real dashboard and the package data.

The checkout keeps one copy of the dashboard (clients/dashboard); serstream/dashboard holds
symlinks to it, which the wheel build resolves into files.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = ("index.html", "app.js", "style.css")


def test_packaged_dashboard_links_to_the_clients_copy() -> None:
    for name in DASHBOARD_FILES:
        packaged = REPO / "serstream" / "dashboard" / name
        assert packaged.resolve() == (REPO / "clients" / "dashboard" / name).resolve(), name


@pytest.mark.slow
def test_wheel_carries_the_dashboard_files_and_schemas(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("serstream-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in DASHBOARD_FILES:
            inside = f"serstream/dashboard/{name}"
            assert inside in names, sorted(n for n in names if "dashboard" in n)
            assert archive.read(inside) == (REPO / "clients" / "dashboard" / name).read_bytes(), name
        assert any(n.startswith("serstream/schema/") and n.endswith(".json") for n in names)
