"""What a non-editable install gets: the wheel must carry the real dashboard and the package data.

The checkout keeps one copy of the dashboard (clients/dashboard); serstream/dashboard holds
symlinks to it, which the wheel build resolves into files.
"""

from __future__ import annotations

import json
import os
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


def _build_wheel(dest: Path, source: Path = REPO, pattern: str = "serstream-*.whl") -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dest),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stderr
    return next(dest.glob(pattern))


def test_client_wheel_depends_only_on_websockets(tmp_path: Path) -> None:
    """clients/python builds `serstream-client`: the package serstream_client, requiring websockets only."""
    wheel = _build_wheel(tmp_path, REPO / "clients" / "python", "serstream_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")} == {"serstream_client"}
    assert "serstream_client/py.typed" in names
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in required if "extra ==" not in r] == ["websockets>=13.0"], required


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_analyzes_from_any_folder(tmp_path: Path, synthetic_wav: Path) -> None:
    """pip install of the wheel, then `serstream analyze` from an unrelated folder, on the shipped model.

    The fresh venv gets the wheel only (``--no-deps``, nothing downloaded); its dependencies
    (numpy, onnxruntime, ...) come from this interpreter's site-packages through a plain ``.pth``
    line, which adds the folder but does not run that folder's own ``.pth`` files, so the editable
    install of the checkout stays invisible and the wheel's copy is the one imported.
    """
    import site
    import sysconfig

    wheel = _build_wheel(tmp_path / "dist")
    client_wheel = _build_wheel(tmp_path / "dist", REPO / "clients" / "python", "serstream_client-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    here = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "serstream-test-deps.pth").write_text("\n".join(sorted(here)) + "\n")
    # Without PYTHONPATH: a checkout on it (with the egg-info a wheel build leaves) reads as "already installed".
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                           "--no-index", str(client_wheel), str(wheel)], capture_output=True, text=True, timeout=300,
                          env=clean)
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:
        pytest.skip("this pip has no --python option")
    assert proc.returncode == 0, proc.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SERSTREAM_MODEL")}
    where = subprocess.run([str(python), "-c", "import serstream, serstream.models as m, serstream_client as c; "
                            "print(serstream.__file__); print(m.default_model_path()); print(c.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    package_file, model_path, client_file = where.stdout.split()
    assert Path(package_file).is_relative_to(purelib), package_file   # the wheel's copy, not the checkout
    assert Path(client_file).is_relative_to(purelib), client_file
    assert Path(model_path).is_file() and Path(model_path).is_relative_to(purelib), model_path
    training = subprocess.run([str(python), "-c", "import training"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)
    assert training.returncode != 0, "the serstream wheel must not install a top-level `training` module"

    proc = subprocess.run([str(python), "-m", "serstream", "analyze", str(synthetic_wav)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    summaries = [e for e in events if e.get("type") == "file"]
    assert len(summaries) == 1 and summaries[0]["label"] in summaries[0]["probs"], events[-3:]
    assert any(e.get("type") == "emotion" and e.get("kind") == "final" for e in events)


@pytest.mark.slow
def test_training_wheel_installs_under_its_own_name(tmp_path: Path) -> None:
    """training/ builds the `serstream-training` wheel, whose only package is `serstream_training`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(REPO / "training")],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("serstream_training-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
        modules = {name for name in archive.namelist() if name.endswith(".py")}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"serstream_training"}, top_level
    expected = {f"serstream_training/{p.name}" for p in (REPO / "training").glob("*.py")}
    assert modules == expected, sorted(expected ^ modules)
    # Installed under its new name, the package's imports must all be relative: import every module.
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    names = sorted(Path(m).stem for m in modules if not m.endswith("__main__.py"))
    code = ("import importlib, sys\nfor n in sys.argv[1:]: "
            "importlib.import_module('serstream_training.' + n if n != '__init__' else 'serstream_training')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(unpacked)
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
