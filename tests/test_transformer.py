"""The capstone model: it learns the induction task, and SDPA or flashlab inside it give the same losses."""

import copy
import csv
import json

import numpy as np
import pytest
import torch

import flashlab  # noqa: F401  (before numba)
from flashlab.flash import flash_attention
from flashlab.induction import Task, attention_maps, induction_scores, loss_gap_bound, max_changes, train
from flashlab.transformer import ATTENTION, AttentionOnly

TINY = Task()  # vocab 24, segments of 8 to 16 tokens, sequences of 32


def test_the_task_repeats_a_segment_at_a_varying_offset():
    b = TINY.batch(64, torch.Generator().manual_seed(0))
    assert b.inputs.shape == b.targets.shape == b.scored.shape == (64, 31)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert b.period.min() >= 8 and b.period.max() <= 16 and len(set(b.period.tolist())) > 3
    for row, period, scored in zip(b.inputs, b.period.tolist(), b.scored, strict=True):
        segment = row[32 - 2 * period : 32 - period]
        assert len(set(segment.tolist())) == period  # distinct tokens, so the earlier copy is unique
        assert not set(row[: 32 - 2 * period].tolist()) & set(segment.tolist())  # filler: other tokens
        assert scored.sum() == period - 1 and scored[32 - period :].all()
    rows, t = torch.nonzero(b.scored, as_tuple=True)  # the next token sits after the earlier copy
    assert torch.equal(b.targets[rows, t], b.inputs[rows, t - b.period[rows] + 1])


def test_the_model_learns_far_above_chance():
    """Through flashlab's NumPy forward and backward: after 250 steps the last batches' accuracy is more
    than four times chance (1/24); the full induction head forms later, near step 450 (chapter 10)."""
    history = train("flashlab", 250, task=TINY)
    assert sum(history.loss[-20:]) / 20 < history.loss[0] - 0.5  # nats
    assert sum(history.accuracy[-20:]) / 20 > 4 / TINY.vocab


def test_sdpa_and_flashlab_give_losses_within_the_derived_bound():
    """Model in float64, only the heads in float32: along five Adam steps, the two attentions' losses at
    the same weights differ by at most loss_gap_bound (first order in attention's float32 error)."""
    torch.manual_seed(0)
    model = AttentionOnly(TINY.vocab, 2 * TINY.half).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = TINY.batch(8, gen)
        losses = {}
        for name, attend in ATTENTION.items():
            logits = model(b.inputs, lambda q, k, v, f=attend: f(q.float(), k.float(), v.float()).double())
            losses[name] = torch.nn.functional.cross_entropy(logits[b.scored], b.targets[b.scored])
        bound = loss_gap_bound(model, b)
        gap = abs(losses["sdpa"].item() - losses["flashlab"].item())
        assert gap <= bound.atol, f"loss gap {gap:.2e} exceeds {bound}"
        optimiser.zero_grad()
        losses["sdpa"].backward()
        optimiser.step()


def test_training_is_deterministic_and_float32_runs_track_each_other():
    a, b = train("sdpa", 5, task=TINY), train("sdpa", 5, task=TINY)
    assert a.loss == b.loss and a.accuracy == b.accuracy
    assert torch.equal(a.model.unembed.weight, b.model.unembed.weight)


def test_queries_keys_values_and_attention_maps_are_what_the_heads_see():
    model = copy.deepcopy(train("sdpa", 1, task=TINY).model)
    b = TINY.batch(2, torch.Generator().manual_seed(1))
    seen = model.queries_keys_values(b.inputs)
    assert len(seen) == 2 and all(t.shape == (2, 4, 31, 16) for qkv in seen for t in qkv)
    maps = attention_maps(model, b.inputs)
    assert all(np.allclose(p.sum(-1), 1.0, rtol=0, atol=1e-12) for p in maps)  # float64 softmax rows
    assert all(np.all(np.triu(p, 1) == 0) for p in maps)  # causal
    scores = induction_scores(maps, b)
    assert scores.shape == (2, 4) and np.all((scores >= 0) & (scores <= 1))


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="heads=3"):
        AttentionOnly(8, 8, d_model=64, heads=3)


@pytest.mark.parametrize("n, block", [(13, 4), (20, 7), (9, 9)])
def test_max_changes_counts_rises_of_the_running_max(n, block):
    """Keys in increasing order of logit: every tile after a row's first (column 0) raises its max, the
    diagonal tile too (each row sees its own, largest, key there)."""
    q = np.ones((n, 1))
    k = np.arange(n, dtype=float)[:, None]  # the score of key j is j / 1: increasing along the keys
    trace = []
    flash_attention(q, k, k, block_q=block, block_k=block, causal=True, trace=trace)
    counts = max_changes(trace, n)
    rows = np.diff([min(r * block, n) for r in range(counts.shape[0] + 1)])
    expected = np.tril(np.ones_like(counts)) * rows[:, None]
    expected[:, 0] = 0
    np.testing.assert_array_equal(counts, expected)
    k_down = -k  # decreasing: the first tile holds every row's max
    trace = []
    flash_attention(q, k_down, k_down, block_q=block, block_k=block, causal=True, trace=trace)
    assert max_changes(trace, n).sum() == 0


def test_the_train_benchmark_writes_rows_and_provenance(tmp_path):
    """The CSV path of ``python -m flashlab.bench train``, on the CPU at a tiny size (no timing checked)."""
    from flashlab.bench.__main__ import main

    argv = [
        "train",
        "--n",
        "16",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--impls",
        "flashlab,sdpa",
    ]
    assert main(argv + ["--dir", str(tmp_path), "--out", "train"]) == 0
    rows = list(csv.DictReader((tmp_path / "train.csv").open()))
    assert [r["impl"] for r in rows] == ["flashlab", "sdpa"]
    assert all(r["n_tokens"] == "15" and float(r["ms_per_step"]) > 0 for r in rows)
    meta = json.loads((tmp_path / "train.provenance.json").read_text())
    assert meta["command"].startswith("python -m flashlab.bench") and "timing" in meta
