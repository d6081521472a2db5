"""The committed capture of a real model's heads: readable without the model, reproducible with it."""

import hashlib
import importlib.metadata
import importlib.util
import json

import numpy as np
import pytest

from flashlab import capture
from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.tolerance import attention_bound, check_close

NPZ = capture.DATA / "real_heads.npz"


def test_the_committed_capture_is_what_its_provenance_says():
    c = capture.load()
    meta = c.provenance
    arch = meta["architecture"]
    assert NPZ.stat().st_size < 4 * 2**20  # a few MB at most
    assert meta["command"].startswith("python -m flashlab.capture")
    assert hashlib.sha256(NPZ.read_bytes()).hexdigest() == meta["npz_sha256"]
    assert len(c.q) == len(meta["prompts"]) == len(c.tokens)
    for q, k, v, tokens in zip(c.q, c.k, c.v, c.tokens, strict=True):
        n = len(tokens)
        assert q.shape == (len(c.layers), arch["query_heads"], n, arch["head_dim"]) and q.dtype == np.float16
        assert k.shape == v.shape == (len(c.layers), arch["kv_heads"], n, arch["head_dim"])
        assert np.all(np.isfinite(q)) and np.all(np.isfinite(k)) and np.all(np.isfinite(v))
    assert all(check["max_abs_error"] <= check["bound"] for check in meta["check"])


def test_flash_attention_on_real_heads_matches_the_float64_reference():
    c = capture.load()
    q, k, v = (x[0][-1].astype(np.float32) for x in (c.q, c.k, c.v))  # last layer, first prompt
    o = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    group = q.shape[0] // k.shape[0]
    k_rep, v_rep = np.repeat(k, group, 0), np.repeat(v, group, 0)
    o_ref = naive_attention(
        q.astype(np.float64), k_rep.astype(np.float64), v_rep.astype(np.float64), causal=True
    )
    check_close(o, o_ref, attention_bound(q, k_rep, v_rep), "o")


def test_the_npz_writer_gives_the_same_bytes_for_the_same_arrays(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "ids": np.arange(3, dtype=np.int32)}
    capture.write_npz(tmp_path / "x.npz", arrays)
    first = (tmp_path / "x.npz").read_bytes()
    capture.write_npz(tmp_path / "x.npz", arrays)
    assert (tmp_path / "x.npz").read_bytes() == first
    with np.load(tmp_path / "x.npz") as f:
        np.testing.assert_array_equal(f["a"], arrays["a"])


def _models_extra_installed() -> bool:
    try:
        capture.model_path()
    except ImportError:
        return False
    return all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "accelerate"))


@pytest.mark.skipif(
    not _models_extra_installed(), reason="the models extra is not installed (pip install -e '.[models]')"
)
def test_the_capture_command_reproduces_the_committed_file_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = json.loads((capture.DATA / "real_heads.provenance.json").read_text())
    versions = {name: importlib.metadata.version(name) for name in meta["versions"]}
    if versions != meta["versions"]:
        pytest.skip(f"installed versions {versions} differ from the capture's {meta['versions']}")
    capture.main(["--out", str(tmp_path / "real_heads.npz")])
    assert (tmp_path / "real_heads.npz").read_bytes() == NPZ.read_bytes()
