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

from flashlab.inputs import attention_inputs
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


def shard_state(q, q_runs, k, v, k_runs, scale: float, causal: bool) -> tuple[State, int]:
    """The state of local queries ``q (B, n, d)`` (global ranges ``q_runs``) over one K/V shard.

    Each pair of a query run and a key run is a block: skipped if causal and wholly above the
    diagonal, masked if it crosses it. Returns the state and the number of scores computed.
    """
    state = empty_state(q.shape[:-1], v.shape[-1], q.dtype)
    scores, q0 = 0, 0
    for qa, qb in q_runs:
        rows = slice(q0, q0 + qb - qa)
        k0 = 0
        for ka, kb in k_runs:
            cols = slice(k0, k0 + kb - ka)
            k0 += kb - ka
            if causal and ka > qb - 1:  # every key after every query: nothing visible
                continue
            mask = (
                np.arange(ka, kb)[None, :] <= np.arange(qa, qb)[:, None] if causal and kb - 1 > qa else None
            )
            part = partial_state(q[:, rows], k[:, cols], v[:, cols], scale, mask)
            mine = State(state.m[:, rows], state.l[:, rows], state.o[:, rows])
            state.m[:, rows], state.l[:, rows], state.o[:, rows] = merge(mine, part)
            scores += (qb - qa) * (kb - ka)
        q0 += qb - qa
    return state, scores


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
    kv = torch.from_numpy(
        np.ascontiguousarray(np.concatenate([a.k, a.v], axis=-1).reshape(-1, n_loc, d + d_v))
    )
    state = empty_state(q3.shape[:-1], d_v, q3.dtype)
    send_to, recv_from = ((rank + d) % world for d in (1, -1))  # ring neighbours, as global ranks:
    if group is not None:
        send_to, recv_from = dist.get_global_rank(group, send_to), dist.get_global_rank(group, recv_from)
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


# --- Spawning P processes from Python (a notebook) ------------------------------------------------


class RingResult(NamedTuple):
    """What :func:`run_ring` returns: the full output, lse, and every rank's :class:`StepStats`."""

    o: np.ndarray
    lse: np.ndarray
    stats: list[list[StepStats]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, jobs: list[dict], timeout: float) -> None:
    """One spawned rank: join the gloo group, run :func:`ring_attention` once per job, save the results."""
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
                q, k, v = f["q"], f["k"], f["v"]
            stats = []
            ring_options = {key: value for key, value in options.items() if key != "fail_rank"}
            with threadpool_limits(1, user_api="blas"):
                o, lse = ring_attention(q, k, v, return_lse=True, stats=stats, **ring_options)
            np.savez(folder / f"out{job}_{rank}.npz", o=o, lse=lse, stats=np.array(stats, dtype=float))
        dist.destroy_process_group()
    except Exception as e:  # reported by the parent, naming this rank
        (folder / f"error{rank}.txt").write_text(f"{type(e).__name__}\n{e}\n\n{traceback.format_exc()}")
        sys.exit(1)


def launch(jobs: list[tuple[list, dict]], *, timeout: float = 60.0) -> list[list[tuple]]:
    """Spawn one process per rank and run :func:`ring_attention` once per job, in one process group.

    ``jobs``: ``(shards, options)`` pairs, ``shards`` a ``(q, k, v)`` per rank (all jobs the same
    number of ranks), ``options`` keywords of :func:`ring_attention` (plus ``fail_rank``: that rank
    exits at the start of the job). Returns per job, per rank ``(o, lse, stats)``. A rank that
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
            for rank, (q, k, v) in enumerate(shards):
                np.savez(Path(folder) / f"in{job}_{rank}.npz", q=q, k=k, v=v)
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


def _load(path: Path) -> tuple:
    """One rank's saved ``(o, lse, stats)``."""
    with np.load(path) as f:
        return f["o"], f["lse"], [StepStats(*_ints(row)) for row in f["stats"]]


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
    q, k, v, *, world: int, causal=False, scale=None, layout="zigzag", timeout=60.0, fail_rank=None
) -> RingResult:
    """Ring attention of full ``q (..., N, d)``, ``k``, ``v`` on ``world`` spawned gloo processes.

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
        shards = [tuple(shard(x, world, r, lay) for x in (q, k, v)) for r in range(world)]
        jobs.append((shards, dict(causal=causal, scale=scale, layout=lay, fail_rank=fail_rank)))
    results = {}
    for lay, ranks in zip(layouts, launch(jobs, timeout=timeout), strict=True):
        o = unshard([r[0] for r in ranks], lay)
        lse = unshard([r[1][..., None] for r in ranks], lay)[..., 0]
        results[lay] = RingResult(o, lse, [r[2] for r in ranks])
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
