"""Ring attention (context parallelism) on ``torch.distributed``: the merge across processes.

Each of ``P`` processes (ranks) holds a shard of the sequence: its rows of Q, K and V. The K/V
shards travel around a ring: at step ``t`` rank ``r`` holds the K/V shard of rank ``(r - t) mod P``,
computes the partial :class:`flashlab.online_softmax.State` of its queries over those keys, merges
it into its running state with chapter 1's :func:`~flashlab.online_softmax.merge`, and passes the
shard on to rank ``r + 1`` (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise
Transformers"). The transfer of the next shard is started (``isend``/``irecv``) *before* the
compute on the current one, so the two overlap. After ``P`` steps every rank has seen every key
and holds the exact attention of its own query rows. No rank ever holds more than two K/V shards.

Causal attention makes the work uneven: with *contiguous* shards, rank ``r`` owns positions
``r N/P .. (r+1) N/P - 1`` and its queries see only the shards of ranks ``<= r``, so the last rank
computes ``P`` blocks while the first computes one. *Zig-zag* sharding cuts the sequence into
``2P`` chunks and gives rank ``r`` chunks ``r`` and ``2P - 1 - r``: one early, one late, so every
rank computes the same number of scores (:func:`causal_work`).

The backward (:func:`ring_attention_backward`) runs the same ring with the gradients: each rank
keeps its Q, O, dO and lse, and the K/V shards travel as before, now each with an accumulator for
its dK and dV. At every step a rank adds the contributions of its queries to the shard it holds
(Algorithm 4's lines 11-22 on one block) and passes the accumulator on; after ``P`` passes every
accumulator is back home, holding the sum over all ranks' queries, while dQ never leaves its rank.

Backend gloo runs on any CPU: ``torchrun --nproc-per-node 4 -m flashlab.ring -n 8192 -d 64 --causal``
from a shell, :func:`run_ring` (spawned processes) from a notebook.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flashlab.inputs import attention_inputs, backward_inputs
from flashlab.online_softmax import State, empty_state, merge, state_lse
from flashlab.split_kv import partial_state

LAYOUTS = ("contiguous", "zigzag")


# --- Sharding: which global positions a rank holds ------------------------------------------------


def check_layout(n: int, world: int, layout: str) -> None:
    """ValueError unless ``layout`` is known and ``world`` divides ``n`` (zig-zag: ``2 world``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
        raise ValueError(f"world (the number of processes P) must be a positive integer, got {world!r}")
    parts = world if layout == "contiguous" else 2 * world
    if n % parts:
        raise ValueError(
            f"n={n}: {layout} sharding over P={world} processes cuts the sequence into {parts} equal "
            f"parts, so n must be a multiple of {parts} (e.g. {parts * max(1, round(n / parts))})"
        )


def shard_runs(n: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The global position ranges ``[start, stop)`` that ``rank`` holds, in the order it stores them."""
    check_layout(n, world, layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    if layout == "contiguous":
        size = n // world
        return [(rank * size, (rank + 1) * size)]
    size = n // (2 * world)
    return [(rank * size, (rank + 1) * size), ((2 * world - 1 - rank) * size, (2 * world - rank) * size)]


def shard_positions(n: int, world: int, rank: int, layout: str) -> np.ndarray:
    """The global positions of ``rank``'s rows: ``n / world`` integers."""
    return np.concatenate([np.arange(a, b) for a, b in shard_runs(n, world, rank, layout)])


def shard(x, world: int, rank: int, layout: str = "zigzag") -> np.ndarray:
    """``rank``'s rows of ``x (..., N, d)`` along the sequence axis (-2)."""
    x = np.asarray(x)
    return x[..., shard_positions(x.shape[-2], world, rank, layout), :]


def unshard(shards: list, layout: str = "zigzag") -> np.ndarray:
    """The inverse of :func:`shard`: the full ``(..., N, d)`` array from every rank's shard, in rank order."""
    world = len(shards)
    n = sum(np.shape(s)[-2] for s in shards)
    out = np.empty(np.shape(shards[0])[:-2] + (n,) + np.shape(shards[0])[-1:], np.asarray(shards[0]).dtype)
    for rank, s in enumerate(shards):
        out[..., shard_positions(n, world, rank, layout), :] = s
    return out


# --- Closed forms: bytes on the wire and causal work per rank ------------------------------------


def ring_bytes(n: int, d: int, d_v: int, world: int, itemsize: int = 4, batch: int = 1) -> int:
    """Bytes each rank sends (and receives) in one forward: ``(P - 1) B (N / P) (d + d_v) itemsize``.

    Every rank forwards a K/V shard of ``N / P`` rows ``P - 1`` times; the last shard it sees is
    not passed on. The same for every rank and every layout.
    """
    return (world - 1) * batch * (n // world) * (d + d_v) * itemsize


def ring_backward_bytes(n: int, d: int, d_v: int, world: int, itemsize: int = 4, batch: int = 1) -> int:
    """Bytes each rank sends (and receives) in one backward: ``(2P - 1) B (N / P) (d + d_v) itemsize``.

    A K/V shard is passed on ``P - 1`` times, as in the forward (:func:`ring_bytes`); its dK/dV
    accumulator, of the same size, ``P`` times: the last pass brings it home.
    """
    return (2 * world - 1) * batch * (n // world) * (d + d_v) * itemsize


def causal_work(n: int, world: int, layout: str) -> np.ndarray:
    """Scores each rank computes in causal ring attention, per head: ``(P,)`` integers.

    Work is counted in blocks of (query run, key run) as :func:`shard_state` computes them: a block
    below the diagonal costs every score, one crossing it every score too (masked), one above it 0.
    Contiguous (block ``s = N/P``): rank ``r`` computes ``r + 1`` blocks, ``(r + 1) s^2``.
    Zig-zag (chunk ``c = N / 2P``): on its own shard 3 chunk pairs, on every other shard 2,
    ``(2P + 1) c^2`` for every rank.
    """
    check_layout(n, world, layout)
    if layout == "contiguous":
        return np.arange(1, world + 1) * (n // world) ** 2
    return np.full(world, (2 * world + 1) * (n // (2 * world)) ** 2)


# --- One rank's ring ------------------------------------------------------------------------------


class StepStats(NamedTuple):
    """One rank at one ring step: whose K/V, scores computed (per head), seconds computing and waiting."""

    step: int
    source: int
    scores: int
    compute_s: float
    wait_s: float
    bytes_sent: int
    bytes_received: int


def shard_blocks(q_runs, k_runs, causal: bool):
    """The blocks one rank computes against one K/V shard: ``(rows, cols, mask)`` per pair of a query
    run and a key run (local slices), skipping a block wholly above the diagonal when ``causal``;
    ``mask`` (True = visible) only for a block that crosses it, else None."""
    q0 = 0
    for qa, qb in q_runs:
        k0 = 0
        for ka, kb in k_runs:
            if not (causal and ka > qb - 1):  # every key after every query: nothing visible
                mask = (
                    np.arange(ka, kb)[None, :] <= np.arange(qa, qb)[:, None]
                    if causal and kb - 1 > qa
                    else None
                )
                yield slice(q0, q0 + qb - qa), slice(k0, k0 + kb - ka), mask
            k0 += kb - ka
        q0 += qb - qa


def shard_state(q, q_runs, k, v, k_runs, scale: float, causal: bool) -> tuple[State, int]:
    """The state of local queries ``q (B, n, d)`` (global ranges ``q_runs``) over one K/V shard.

    Each pair of a query run and a key run is a block (:func:`shard_blocks`). Returns the state and
    the number of scores computed.
    """
    state = empty_state(q.shape[:-1], v.shape[-1], q.dtype)
    scores = 0
    for rows, cols, mask in shard_blocks(q_runs, k_runs, causal):
        part = partial_state(q[:, rows], k[:, cols], v[:, cols], scale, mask)
        mine = State(state.m[:, rows], state.l[:, rows], state.o[:, rows])
        state.m[:, rows], state.l[:, rows], state.o[:, rows] = merge(mine, part)
        scores += (rows.stop - rows.start) * (cols.stop - cols.start)
    return state, scores


def shard_gradients(q, do, lse, delta, q_runs, k, v, k_runs, scale: float, causal: bool):
    """This rank's queries' contributions to the gradients over one K/V shard: ``(dq, dk, dv, scores)``.

    ``q (B, n, d)``, ``do (B, n, d_v)``, ``lse, delta (B, n)`` (``delta = rowsum(dO * O)``) of the
    local rows; ``k, v`` the shard. Per block (:func:`shard_blocks`), Algorithm 4's lines 11-22:
    ``P = exp(S - lse)``, ``dV += P^T dO``, ``dS = P (dO V^T - D)``, ``dQ += scale dS K``,
    ``dK += scale dS^T Q``. ``dq`` is the sum over this shard's keys; ``dk, dv`` are this shard's
    rows' sums over the local queries.
    """
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    lse = np.where(np.isfinite(lse), lse, 0.0)[..., None]  # a row that sees no key has P = 0
    scores = 0
    for rows, cols, mask in shard_blocks(q_runs, k_runs, causal):
        s = scale * (q[:, rows] @ np.swapaxes(k[:, cols], -1, -2))
        p = np.exp((s if mask is None else np.where(mask, s, -np.inf)) - lse[:, rows])
        dv[:, cols] += np.swapaxes(p, -1, -2) @ do[:, rows]
        ds = p * (do[:, rows] @ np.swapaxes(v[:, cols], -1, -2) - delta[:, rows, None])
        dq[:, rows] += scale * (ds @ k[:, cols])
        dk[:, cols] += scale * (np.swapaxes(ds, -1, -2) @ q[:, rows])
        scores += (rows.stop - rows.start) * (cols.stop - cols.start)
    return dq, dk, dv, scores


def _check_shards(a, world: int, group) -> None:
    """Every rank must hold shards of one shape: all-gather them and compare (ValueError on all ranks)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(
        [a.q.shape[-2], a.k.shape[-2], a.q.shape[-1], a.v.shape[-1], math.prod(a.q.shape[:-2])]
    )
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    table = [tuple(int(x) for x in s) for s in shapes]
    if len(set(table)) > 1:
        raise ValueError(
            "shards mismatch: every rank must hold the same number of query and key rows, head dims and "
            f"batch; got (N_q, N_k, d, d_v, batch) per rank {table}"
        )
    if a.q.shape[-2] != a.k.shape[-2]:
        raise ValueError(
            f"each rank must hold the same rows of Q and of K/V (one sequence), got {a.q.shape[-2]} query "
            f"rows and {a.k.shape[-2]} key rows"
        )


def ring_attention(
    q, k, v, *, causal=False, scale=None, layout="zigzag", return_lse=False, stats=None, group=None
):
    """Attention of this rank's query rows over the whole sequence, the K/V shards passed around a ring.

    Call on every rank of an initialised ``torch.distributed`` process group (``group``, default the
    world), each with its shard ``q (..., N/P, d)``, ``k (..., N/P, d)``, ``v (..., N/P, d_v)`` as
    cut by :func:`shard` with ``layout``. Conventions as :func:`flashlab.naive_attention` on the
    full sequence (``causal``: key ``j`` visible to query ``i`` iff ``j <= i``, global positions).
    ``stats``: optional list; gets a :class:`StepStats` per step. Returns this rank's rows of
    ``o (..., N/P, d_v)`` (or ``(o, lse)``), in its input dtype (float16: computed in float32).
    """
    import torch
    import torch.distributed as dist

    a = attention_inputs(q, k, v, scale)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_shards(a, world, group)
    lead, n_loc, d, d_v = a.q.shape[:-2], a.q.shape[-2], a.q.shape[-1], a.v.shape[-1]
    n = n_loc * world
    q3 = a.q.reshape(-1, n_loc, d)
    kv = _pack(a.k, a.v)
    state = empty_state(q3.shape[:-1], d_v, q3.dtype)
    send_to, recv_from = _neighbours(rank, world, group)
    for step in range(world):
        source = (rank - step) % world
        requests, sent = [], 0
        if step < world - 1:  # start passing this shard on, and receiving the next, before computing
            incoming = torch.empty_like(kv)
            requests = [dist.isend(kv, send_to, group=group), dist.irecv(incoming, recv_from, group=group)]
            sent = kv.numel() * kv.element_size()
        t0 = time.perf_counter()
        block = kv.numpy()
        part, scores = shard_state(
            q3,
            shard_runs(n, world, rank, layout),
            block[..., :d],
            block[..., d:],
            shard_runs(n, world, source, layout),
            a.scale,
            causal,
        )
        state = merge(state, part)
        t1 = time.perf_counter()
        for request in requests:
            request.wait()
        if stats is not None:
            stats.append(StepStats(step, source, scores, t1 - t0, time.perf_counter() - t1, sent, sent))
        if requests:
            kv = incoming
    o = state.o.reshape(lead + (n_loc, d_v)).astype(a.out_dtype, copy=False)
    lse = state_lse(state).reshape(lead + (n_loc,))
    return (o, lse) if return_lse else o


def _pack(k, v):
    """K and V side by side, ``(B, n, d + d_v)``: one tensor to pass around the ring."""
    import torch

    n = k.shape[-2]
    return torch.from_numpy(
        np.ascontiguousarray(np.concatenate([k, v], axis=-1).reshape(-1, n, k.shape[-1] + v.shape[-1]))
    )


def _neighbours(rank: int, world: int, group) -> tuple[int, int]:
    """The ranks this one sends to and receives from, as global ranks (what isend/irecv take)."""
    import torch.distributed as dist

    send_to, recv_from = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        send_to, recv_from = dist.get_global_rank(group, send_to), dist.get_global_rank(group, recv_from)
    return send_to, recv_from


def ring_attention_backward(
    q, k, v, o, lse, do, *, causal=False, scale=None, layout="zigzag", stats=None, group=None
):
    """Gradients ``(dq, dk, dv)`` of this rank's shards, the K/V shards and their dK/dV accumulators
    passed around the ring.

    Call on every rank, after :func:`ring_attention`, with the same shards and options, that rank's
    ``o`` and ``lse`` (``return_lse=True``) and ``do = dL/dO`` of its rows (``(..., N/P, d_v)``).
    At step ``t`` the rank holds the K/V shard of rank ``s = (r - t) mod P`` and its accumulator:
    it starts receiving the next K/V shard, adds its queries' contributions
    (:func:`shard_gradients`) to dQ and to the accumulator, then passes the accumulator on. After
    ``P`` passes the accumulator of shard ``s`` is back at rank ``s``. ``stats`` gets a
    :class:`StepStats` per step (``wait_s``: waiting for K/V and for the accumulator).
    Returns ``dq, dk, dv`` shaped as this rank's ``q, k, v``.
    """
    import torch
    import torch.distributed as dist

    a, o, lse, do = backward_inputs(q, k, v, o, lse, do, scale)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_shards(a, world, group)
    lead, n_loc, d, d_v = a.q.shape[:-2], a.q.shape[-2], a.q.shape[-1], a.v.shape[-1]
    n = n_loc * world
    q3, do3, lse3 = a.q.reshape(-1, n_loc, d), do.reshape(-1, n_loc, d_v), lse.reshape(-1, n_loc)
    delta = np.sum(do3 * o.reshape(-1, n_loc, d_v), axis=-1)  # D = rowsum(dO * O), once per row
    kv, grad = _pack(a.k, a.v), torch.zeros(q3.shape[0], n_loc, d + d_v, dtype=getattr(torch, str(q3.dtype)))
    dq = np.zeros_like(q3)
    send_to, recv_from = _neighbours(rank, world, group)
    for step in range(world):
        source = (rank - step) % world
        requests, sent = [], grad.numel() * grad.element_size()
        if step < world - 1:  # the next K/V shard travels while this one is computed on
            incoming = torch.empty_like(kv)
            requests = [dist.isend(kv, send_to, group=group), dist.irecv(incoming, recv_from, group=group)]
            sent += kv.numel() * kv.element_size()
        t0 = time.perf_counter()
        block = kv.numpy()
        dq_s, dk_s, dv_s, scores = shard_gradients(
            q3, do3, lse3, delta, shard_runs(n, world, rank, layout),
            block[..., :d], block[..., d:], shard_runs(n, world, source, layout), a.scale, causal,
        )  # fmt: skip
        dq += dq_s
        acc = grad.numpy()
        acc[..., :d] += dk_s
        acc[..., d:] += dv_s
        t1 = time.perf_counter()
        arrived = torch.empty_like(grad)  # the accumulator moves on only once this rank has added to it
        requests += [  # tag 1: never matched with a K/V shard (tag 0) of the same size
            dist.isend(grad, send_to, group=group, tag=1),
            dist.irecv(arrived, recv_from, group=group, tag=1),
        ]
        for request in requests:
            request.wait()
        if stats is not None:
            stats.append(StepStats(step, source, scores, t1 - t0, time.perf_counter() - t1, sent, sent))
        grad = arrived
        if step < world - 1:
            kv = incoming
    home = grad.numpy()  # after P passes: this rank's own shard's dK, dV
    grads = (dq, home[..., :d], home[..., d:])
    shapes = (lead + (n_loc, d), lead + (n_loc, d), lead + (n_loc, d_v))
    return tuple(
        g.reshape(shape).astype(a.out_dtype, copy=False) for g, shape in zip(grads, shapes, strict=True)
    )


# --- Spawning P processes from Python (a notebook) ------------------------------------------------


class RingResult(NamedTuple):
    """What :func:`run_ring` returns: the full output, lse, every rank's :class:`StepStats`, and
    (when it was given ``do``) the full gradients and every rank's backward :class:`StepStats`."""

    o: np.ndarray
    lse: np.ndarray
    stats: list[list[StepStats]]
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    backward_stats: list[list[StepStats]] | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, jobs: list[dict], timeout: float) -> None:
    """One spawned rank: join the gloo group, run :func:`ring_attention` once per job (and
    :func:`ring_attention_backward` when the job has ``do``), save the results."""
    import torch
    import torch.distributed as dist
    from threadpoolctl import threadpool_limits

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    folder = Path(folder)
    torch.set_num_threads(1)  # P processes share the machine's cores: one thread each
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        for job, options in enumerate(jobs):
            if options.get("fail_rank") == rank:
                os._exit(3)  # a rank that dies without a word, as a crashed machine would
            with np.load(folder / f"in{job}_{rank}.npz") as f:
                arrays = dict(f)
            q, k, v = arrays["q"], arrays["k"], arrays["v"]
            stats, backward_stats = [], []
            ring_options = {key: value for key, value in options.items() if key != "fail_rank"}
            with threadpool_limits(1, user_api="blas"):
                o, lse = ring_attention(q, k, v, return_lse=True, stats=stats, **ring_options)
                out = dict(o=o, lse=lse, stats=np.array(stats, dtype=float))
                if "do" in arrays:
                    grads = ring_attention_backward(
                        q, k, v, o, lse, arrays["do"], stats=backward_stats, **ring_options
                    )
                    out |= dict(zip(("dq", "dk", "dv"), grads, strict=True))
                    out["backward_stats"] = np.array(backward_stats, dtype=float)
            np.savez(folder / f"out{job}_{rank}.npz", **out)
        dist.destroy_process_group()
    except Exception as e:  # reported by the parent, naming this rank
        (folder / f"error{rank}.txt").write_text(f"{type(e).__name__}\n{e}\n\n{traceback.format_exc()}")
        sys.exit(1)


def launch(jobs: list[tuple[list, dict]], *, timeout: float = 60.0) -> list[list[tuple]]:
    """Spawn one process per rank and run :func:`ring_attention` once per job, in one process group.

    ``jobs``: ``(shards, options)`` pairs, ``shards`` a ``(q, k, v)`` or ``(q, k, v, do)`` per rank
    (all jobs the same number of ranks; with ``do`` the backward runs too), ``options`` keywords of
    :func:`ring_attention` (plus ``fail_rank``: that rank exits at the start of the job). Returns
    per job, per rank a dict: ``o, lse, stats`` (and ``dq, dk, dv, backward_stats``). A rank that
    raises re-raises here (ValueError as ValueError, naming the rank); a rank that dies, or a run
    longer than ``timeout`` seconds, raises ``RuntimeError`` / ``TimeoutError`` once the other
    ranks are stopped: never a hang.
    """
    import torch.multiprocessing as mp

    world = len(jobs[0][0])
    if any(len(shards) != world for shards, _ in jobs):
        raise ValueError(f"every job must have one shard per rank, {world} like the first")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        for job, (shards, _) in enumerate(jobs):
            for rank, arrays in enumerate(shards):
                names = ("q", "k", "v", "do")[: len(arrays)]
                np.savez(Path(folder) / f"in{job}_{rank}.npz", **dict(zip(names, arrays, strict=True)))
        args = (world, free_port(), folder, [options for _, options in jobs], timeout)
        procs = [context.Process(target=_worker, args=(rank, *args), daemon=True) for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.exitcode is None for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let the other ranks notice and record their errors too
                    _raise_failure(Path(folder), procs)
                if time.monotonic() > deadline:
                    running = [r for r, p in enumerate(procs) if p.exitcode is None]
                    raise TimeoutError(
                        f"ring attention did not finish in {timeout} s; ranks {running} still running"
                    )
                time.sleep(0.02)
            if any(p.exitcode != 0 for p in procs):
                _raise_failure(Path(folder), procs)
            return [
                [_load(Path(folder) / f"out{job}_{rank}.npz") for rank in range(world)]
                for job in range(len(jobs))
            ]
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()


def _load(path: Path) -> dict:
    """One rank's saved results: arrays, and every ``*stats`` as a list of :class:`StepStats`."""
    with np.load(path) as f:
        return {
            key: [StepStats(*_ints(row)) for row in f[key]] if key.endswith("stats") else f[key] for key in f
        }


def _ints(row) -> tuple:
    """A saved :class:`StepStats` row with its counts back as integers."""
    step, source, scores, compute_s, wait_s, sent, received = row
    return int(step), int(source), int(scores), float(compute_s), float(wait_s), int(sent), int(received)


def _raise_failure(folder: Path, procs) -> None:
    """Raise for the failed ranks: a rank that died silently first, else the error a rank recorded."""
    codes = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
    silent = [r for r in codes if not (folder / f"error{r}.txt").exists()]
    if silent:
        raise RuntimeError(
            f"rank {silent[0]} died (exit code {codes[silent[0]]}) during ring attention; "
            "the other ranks were stopped"
        )
    rank = min(codes)
    kind, message = (folder / f"error{rank}.txt").read_text().split("\n", 2)[:2]
    raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank {rank}: {kind}: {message}")


def run_ring(
    q, k, v, do=None, *, world: int, causal=False, scale=None, layout="zigzag", timeout=60.0, fail_rank=None
) -> RingResult:
    """Ring attention of full ``q (..., N, d)``, ``k``, ``v`` on ``world`` spawned gloo processes;
    with ``do (..., N, d_v)`` also its backward (:func:`ring_attention_backward`).

    Shards the inputs with :func:`shard` (ValueError unless ``world`` divides N, zig-zag ``2 world``),
    runs :func:`ring_attention` on every shard, and puts the outputs back in sequence order.
    ``layout`` may also be a tuple of layouts: then one :class:`RingResult` per layout (a dict),
    all from one set of processes. ``fail_rank``: kill that rank after it joins the group, to see
    the failure reported (no hang).
    """
    layouts = (layout,) if isinstance(layout, str) else tuple(layout)
    a = attention_inputs(q, k, v, scale)
    if a.q.shape[-2] != a.k.shape[-2]:
        raise ValueError(
            f"ring attention is self-attention: N_q must equal N_k, got {a.q.shape[-2]}, {a.k.shape[-2]}"
        )
    jobs = []
    for lay in layouts:
        check_layout(a.q.shape[-2], world, lay)
        full = (q, k, v) if do is None else (q, k, v, do)
        shards = [tuple(shard(x, world, r, lay) for x in full) for r in range(world)]
        jobs.append((shards, dict(causal=causal, scale=scale, layout=lay, fail_rank=fail_rank)))
    results = {}
    for lay, ranks in zip(layouts, launch(jobs, timeout=timeout), strict=True):
        o = unshard([r["o"] for r in ranks], lay)
        lse = unshard([r["lse"][..., None] for r in ranks], lay)[..., 0]
        grads = None if do is None else tuple(unshard([r[g] for r in ranks], lay) for g in ("dq", "dk", "dv"))
        backward = None if do is None else [r["backward_stats"] for r in ranks]
        results[lay] = RingResult(o, lse, [r["stats"] for r in ranks], grads, backward)
    return results[layout] if isinstance(layout, str) else results


# --- torchrun entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node P -m flashlab.ring -n N -d D [--causal]``: run, check, count."""
    import torch.distributed as dist

    from flashlab.split_kv import split_kv_attention
    from flashlab.tolerance import Bound, attention_bound, check_close

    p = argparse.ArgumentParser(prog="python -m flashlab.ring", description=main.__doc__)
    # not --n / --d: torchrun's own parser would take them for abbreviations of its options
    p.add_argument("-n", "--seq-len", dest="n", type=int, default=8192, help="sequence length N")
    p.add_argument("-d", "--head-dim", dest="d", type=int, default=64, help="head dim")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=LAYOUTS, default="zigzag")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(args.n, world, args.layout)
    rng = np.random.default_rng(args.seed)  # every rank draws the same full inputs and keeps its shard
    q, k, v = (rng.standard_normal((args.heads, args.n, args.d)).astype(np.float32) for _ in range(3))
    stats = []
    t0 = time.perf_counter()
    o = ring_attention(
        *(shard(x, world, rank, args.layout) for x in (q, k, v)),
        causal=args.causal,
        layout=args.layout,
        stats=stats,
    )
    seconds = time.perf_counter() - t0
    gathered = [None] * world
    dist.gather_object((o, stats, seconds), gathered if rank == 0 else None, dst=0)
    if rank == 0:
        o_ref = split_kv_attention(
            *(x.astype(np.float64) for x in (q, k, v)), splits=world, causal=args.causal
        )
        full = unshard([g[0] for g in gathered], args.layout)
        rows = range(0, args.n, 1024)  # the bound is a max over rows: take it block by block, exactly
        atol = max(attention_bound(q[:, r : r + 1024], k, v).atol for r in rows)
        error = check_close(full, o_ref, Bound(atol, "attention_bound, max over blocks of 1024 rows"))
        closed = ring_bytes(args.n, args.d, args.d, world, 4, args.heads)
        work = causal_work(args.n, world, args.layout) if args.causal else None
        print(
            f"ring attention, P={world}, N={args.n}, d={args.d}, heads={args.heads}, "
            f"{'causal ' + args.layout if args.causal else 'full'}: max error {error:.2e} <= bound {atol:.2e}"
        )
        for r, (_, st, sec) in enumerate(gathered):
            sent = sum(s.bytes_sent for s in st)
            scores = sum(s.scores for s in st)
            expect = f", closed form {work[r]}" if work is not None else ""
            print(
                f"  rank {r}: sent {sent} B = received {sum(s.bytes_received for s in st)} B "
                f"(closed form {closed}); scores {scores}{expect}; compute "
                f"{sum(s.compute_s for s in st):.3f} s, waiting {sum(s.wait_s for s in st):.3f} s, "
                f"total {sec:.3f} s"
            )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
