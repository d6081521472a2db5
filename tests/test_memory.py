"""The memory model's bookkeeping: traffic per tensor, SRAM occupancy, peak, overflow, summary."""

import inspect

import numpy as np
import pytest

import flashlab  # noqa: F401  (before numba)
from flashlab import attention, backward, flash
from flashlab.memory import MemoryModel, SRAMOverflow, hbm, host, store
from flashlab.traffic import Traffic


def test_reads_writes_counted_per_tensor_in_elements_and_bytes():
    memory = MemoryModel()
    memory.read("Q", np.ones((4, 8), np.float32))
    memory.read("Q", np.ones((2, 8), np.float64))
    memory.write("lse", np.ones(4, np.float32))
    assert memory.traffic() == Traffic({"Q": 48}, {"lse": 4})
    assert (memory.hbm_read_bytes, memory.hbm_write_bytes) == (32 * 4 + 16 * 8, 16)
    assert memory.read_elements["K"] == 0 and "K" not in memory.read_elements  # nothing invented


def test_hold_replaces_free_releases_and_the_peak_remembers_its_tiles():
    memory = MemoryModel(sram_bytes=1000)
    memory.hold("K", np.ones(100, np.float32))  # 400 B
    memory.hold("S", 300)
    memory.hold("S", 200)  # replaces the earlier S
    assert memory.sram_used_bytes == 600 and memory.sram_peak_bytes == 700
    assert memory.sram_peak_tiles == {"K": 400, "S": 300}
    memory.free("S", "not held")
    assert memory.held == {"K": 400} and memory.sram_used_bytes == 400
    memory.hold("V", 600)  # exactly full is fine
    with pytest.raises(SRAMOverflow, match=r"holding 'P'.*1100 B > sram_bytes=1000 B \(over by 100 B\)"):
        memory.hold("P", 100)


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_hold_refuses_a_byte_count_that_is_not_a_count(bad):
    with pytest.raises(TypeError, match="tile must be an array or a byte count"):
        MemoryModel().hold("S", bad)  # a negative count would silently lower the occupancy


def test_overflow_without_matrix_tiles_still_says_what_to_do():
    memory = MemoryModel(sram_bytes=10)
    with pytest.raises(SRAMOverflow, match="Held: S 11 B. Use smaller block sizes"):
        memory.hold("S", 11)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "64"])
def test_sram_bytes_must_be_positive_integer(bad):
    with pytest.raises((ValueError, TypeError), match="sram_bytes"):
        MemoryModel(sram_bytes=bad)


def test_summary_prices_elements_at_a_chosen_dtype():
    memory = MemoryModel()
    memory.read("K", np.ones((10, 4), np.float32))
    memory.write("lse", np.ones(10, np.float32))
    memory.hold("K", np.ones((10, 4), np.float32))
    lines = memory.summary().splitlines()
    assert lines[1].split() == ["K", "40", "0", "160", "0"]
    assert lines[-1] == "SRAM peak 160 B as counted (K 160 B)"
    fp16 = memory.summary(dtype_bytes=2, tensor_bytes={"lse": 4}).splitlines()
    assert fp16[2].split() == ["lse", "0", "10", "0", "40"]
    assert fp16[3].split() == ["total", "40", "10", "80", "40"]


def test_hbm_tensor_counts_every_slice_taken_and_assigned():
    memory = MemoryModel()
    t = hbm(memory, "X", np.zeros((4, 6), np.float32))
    _ = t[1:3], t[:, :2]
    t[0] = 1.0  # a broadcast assignment writes the whole slice
    assert memory.read_elements["X"] == 2 * 6 + 4 * 2 and memory.write_elements["X"] == 6
    assert memory.read_bytes["X"] == 4 * (2 * 6 + 4 * 2)
    assert t.shape == (4, 6) and t.dtype == np.float32 and host(t) is t.array
    assert memory.read_elements["X"] == 20  # shape, dtype and host() move nothing
    s = store(memory, "S", np.ones(5))
    assert memory.write_elements["S"] == 5 and np.array_equal(host(s), np.ones(5))
    plain = np.ones(3)
    assert hbm(None, "X", plain) is plain and store(None, "S", plain) is plain


def test_a_tile_taken_is_read_only_so_hbm_changes_only_through_a_counted_write():
    memory = MemoryModel()
    t = hbm(memory, "X", np.zeros((4, 6)))
    tile = t[1:3]
    with pytest.raises(ValueError, match="read-only"):
        tile += 1.0
    with pytest.raises(ValueError, match="read-only"):
        t[0] += 1.0  # read-modify-write in place: write t[0] = t[0] + 1 instead
    t[0] = t[0] + 1.0
    assert host(t)[0].tolist() == [1.0] * 6 and not host(t)[1:].any()
    assert (memory.read_elements["X"], memory.write_elements["X"]) == (2 * 6 + 6 + 6, 6)
    assert hbm(memory, "Y", t) is t  # a tensor handed on stays the one tensor it was


def test_algorithms_never_call_the_counter_for_hbm_traffic():
    # the HBM counts (forward and backward) are observed by the wrappers, not declared by the algorithm
    for module in (flash, attention, backward):
        source = inspect.getsource(module)
        assert "memory.read(" not in source and "memory.write(" not in source, module.__name__
