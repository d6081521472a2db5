"""data/hardware.json: one definition of on-chip SRAM, read through flashlab.hardware."""

from __future__ import annotations

import pytest

from flashlab import hardware


def test_shared_memory_is_the_shared_part_not_l1_plus_shared():
    assert hardware.shared_memory_bytes("A100") == 164 * 1024  # the paper's 192 KB is L1 + shared
    assert hardware.spec("A100")["l1_and_shared_bytes_per_sm"] == 192 * 1024
    assert hardware.shared_memory_bytes("H200") == 228 * 1024
    for gpu in hardware.specs():
        assert hardware.shared_memory_bytes(gpu) < hardware.spec(gpu)["l1_and_shared_bytes_per_sm"]


def test_every_per_sm_key_is_defined_and_no_other_sram_key_exists():
    keys = {
        key for entry in hardware.specs().values() for key in entry if key.endswith(("_per_sm", "l2_bytes"))
    }
    assert keys == set(hardware.definitions())


def test_sram_elements_and_bad_input():
    assert hardware.sram_elements("A100", 2) == 164 * 1024 // 2
    with pytest.raises(ValueError, match="element_bytes"):
        hardware.sram_elements("A100", 0)
    with pytest.raises(ValueError, match="gpu must be one of"):
        hardware.spec("V100")
