"""Device selection happens before numba is imported and is reported for a notebook's first cell."""

import subprocess
import sys

import pytest

import flashlab
from flashlab import device


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_sim_is_chosen_by_environment_before_numba_is_imported():
    code = (
        "import sys, flashlab, os; assert 'numba' not in sys.modules; "
        "print(flashlab.device.MODE, os.environ['NUMBA_ENABLE_CUDASIM']); "
        "from numba import cuda; print(cuda.simulator_enabled if hasattr(cuda, 'simulator_enabled') "
        "else cuda.__name__)"
    )
    out = run_python(code, FLASHLAB_DEVICE="sim")
    assert out.returncode == 0, out.stderr
    mode, flag = out.stdout.split()[:2]
    assert (mode, flag) == ("sim", "1")


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, gpu, sim"):
        device.select("tpu")


@pytest.mark.skipif(device._cuda_gpus(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_says_so():
    out = run_python("import flashlab", FLASHLAB_DEVICE="gpu")
    assert out.returncode != 0 and "reports no GPU" in out.stderr


def test_switching_after_numba_is_imported_is_refused():
    # numba imported in GPU mode (importing it needs no GPU), then flashlab asked for the simulator
    out = run_python("import numba, flashlab", NUMBA_ENABLE_CUDASIM="0", FLASHLAB_DEVICE="sim")
    assert out.returncode != 0 and "numba was imported before flashlab" in out.stderr, out.stderr


def test_report_names_the_device_and_versions():
    info = device.report()
    assert info["mode"] == flashlab.device.MODE
    assert ("simulator" in info["device"]) == (info["mode"] == "sim")
    for dist in ("numpy", "numba", "numba-cuda", "torch"):
        assert info[dist] != "not installed"
    assert info["device"].split(" ")[0] in device.describe()
