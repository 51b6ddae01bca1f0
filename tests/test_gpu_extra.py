"""The `gpu` extra (pyproject.toml) and the provider check, on a machine without a GPU.

No network: the extra is checked against what the installed onnxruntime-gpu itself declares
(its `cuda` and `cudnn` extras) and against the CUDA libraries its provider library links,
and, where this workplace's package list is present, that each name exists on the index.
The provider check runs for real here: no driver, so CPU, one line, nothing else printed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import serstream_command

REPO = Path(__file__).resolve().parent.parent
PACKAGE_LIST = Path("/work/.library/env/packages/pypi.tsv")


def gpu_extra() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(text) for text in project["optional-dependencies"]["gpu"]]
    return {req.name.lower(): req for req in requirements}


def ort_gpu_requirements() -> list[Requirement]:
    try:
        declared = importlib.metadata.requires("onnxruntime-gpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed (a CPU-only onnxruntime)")
    return [Requirement(text) for text in declared]


def test_the_extra_covers_onnxruntime_gpus_own_cuda_and_cudnn_extras() -> None:
    ours = gpu_extra()
    theirs = [req for req in ort_gpu_requirements()
              if req.marker is not None and any(req.marker.evaluate({"extra": e}) for e in ("cuda", "cudnn"))]
    assert theirs, "onnxruntime-gpu declares no cuda/cudnn extras any more: check the gpu extra by hand"
    for req in theirs:
        assert req.name.lower() in ours, f"{req.name} (onnxruntime-gpu[{req.marker}]) is missing from the gpu extra"
        assert str(ours[req.name.lower()].specifier) == str(req.specifier), req.name
    installed = importlib.metadata.version("onnxruntime-gpu")
    assert ours["onnxruntime-gpu"].specifier.contains(installed), installed


def test_the_extra_has_each_library_the_cuda_provider_links() -> None:
    ort_gpu_requirements()
    import onnxruntime
    from onnxruntime.capi import build_and_package_info

    major = int(str(build_and_package_info.cuda_version).split(".")[0])
    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.is_file():
        pytest.skip("this onnxruntime-gpu has no Linux CUDA provider library")
    # Sonames named in the library: its NEEDED entries and the ones it may dlopen (a .so.12 fallback too).
    linked: dict[str, set[int]] = {}
    for lib, number in re.findall(rb"lib(cublasLt|cublas|cudart|curand|cufft|cudnn|nvrtc)\.so\.(\d+)",
                                  provider.read_bytes()):
        linked.setdefault(lib.decode(), set()).add(int(number))
    assert major in linked.get("cublas", set()) and major in linked.get("cudart", set()), linked
    # CUDA 13 dropped the -cuNN suffix of the toolkit wheels; cuDNN keeps it.
    suffix = "" if major >= 13 else f"-cu{major}"
    package = {"cublas": "nvidia-cublas", "cublasLt": "nvidia-cublas", "cudart": "nvidia-cuda-runtime",
               "curand": "nvidia-curand", "cufft": "nvidia-cufft", "nvrtc": "nvidia-cuda-nvrtc"}
    ours = gpu_extra()
    for name, numbers in sorted(linked.items()):
        wanted = f"nvidia-cudnn-cu{major}" if name == "cudnn" else package[name] + suffix
        assert wanted in ours, f"lib{name}.so.{sorted(numbers)} needs {wanted} in the gpu extra"
        if name in ("cublas", "cublasLt", "cudart"):
            # The wheel's version is the soname's major (cuBLAS 13.x ships libcublas.so.13).
            assert any(ours[wanted].specifier.contains(f"{n}.1") for n in numbers), (wanted, ours[wanted].specifier)


# ------------------------------------------------------------------ the provider check, here


def _has_gpu() -> bool:
    from serstream.inference.session import cuda_check

    return cuda_check().usable


PROBE = (
    "from serstream.inference.session import EmotionModel, describe_device\n"
    "import sys\n"
    "model = EmotionModel.load(sys.argv[1], device='auto', threads=1)\n"
    "print(describe_device(model))\n"
)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a usable GPU")
def test_without_a_gpu_auto_is_cpu_in_one_quiet_line(factory_model: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "clients/python/src")]))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(factory_model)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing from ONNX Runtime or preload_dlls, no traceback
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("cpu (CPUExecutionProvider; CUDA not used: "), lines[0]


@pytest.mark.skipif(_has_gpu(), reason="this machine has a usable GPU")
def test_the_startup_line_names_the_provider(factory_model: Path, synthetic_wav: Path, free_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    proc = subprocess.run(
        [*serstream_command(), "listen", "--model", str(factory_model), "--file", str(synthetic_wav), "--fast",
         "--port", str(free_port), "--exit-when-done"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    mentions = [line for line in proc.stderr.splitlines() if "CUDA" in line or "ExecutionProvider" in line]
    assert len(mentions) == 1, proc.stderr
    assert " on cpu (CPUExecutionProvider; CUDA not used: " in mentions[0], mentions[0]
    assert not [line for line in proc.stderr.splitlines() if "onnxruntime" in line.lower()
                and str(factory_model) not in line], proc.stderr
