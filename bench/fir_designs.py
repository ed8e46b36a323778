"""Alternative designs of the blocked FIR forward, timed against the production kernel (docs/design.md).

The production kernel (:mod:`sh2.kernels.fir_blocked`) gives each program one filter group of ``dg = 16``
channels, so it reads rows of 32 bytes at the token stride. This script holds the designs that were tried to
read wider rows and times their forward beside the production launch, with the copy bandwidth of the same run
(protocol of ``shared/ANCHORS.md``: batch 1, D = 4096, bf16, ``do_bench`` median):

- ``batched``: ``groups`` groups per program with batched ``[groups, b, b] @ [groups, b, 16]`` products;
- ``split``: two groups per program, one 2D product per group after ``tl.split`` of a 32-channel tile;
- ``pair``: two neighbouring groups per program walked side by side (two loads, no layout change);
- ``tma``: the production tiling with TMA tile loads and stores (tensor descriptors over ``[B, L, D]``);
- ``three``, ``three_pair``: one or two groups per program with chunks of ``b = K / 2`` and three Toeplitz blocks
  per group (``Y_n = H0 X_n + H1 X_{n-1} + H2 X_{n-2}``), 24 KB per group at ``K = 128`` instead of 64 KB;
- ``production``: :func:`sh2.kernels.fir.fir_forward` with each candidate configuration of its autotuner, and
  the default one with the other grid order (``channel_fast=False``).

Every design is first checked against the float64 Toeplitz reference (``--device cpu`` runs that check alone
under the Triton interpreter at a small size, which is what the tests do)::

    PYTHONPATH=$PWD python bench/fir_designs.py --out fir_designs.json          # one H200: about 1 minute
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python bench/fir_designs.py --device cpu  # correctness only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from bench.common import Budget, bench_ms, copy_bandwidth_gbps, default_device, print_table, run_info, write_json
from sh2.kernels import fir, reference
from sh2.kernels._tuning import interpreted, split_segments
from sh2.kernels.fir_blocked import _load_tile, _tile_ptrs, _to_dot, _toeplitz_blocks

DESIGNS = ("production", "batched", "split", "pair", "tma", "three", "three_pair")


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ld(base, desc, b, t0, t, stride, offs_c, c0, L, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        TMA: tl.constexpr):
    """A ``[BLOCK_T, BLOCK_C]`` fp32 tile of tokens ``t0 + arange`` from a descriptor (TMA) or pointers."""
    if TMA:
        return desc.load([b, t0, c0]).reshape(BLOCK_T, BLOCK_C).to(tl.float32)
    else:
        return _load_tile(base, t, stride, offs_c, L)


@triton.jit
def _st(base, desc, b, t0, t, stride, offs_c, c0, L, y, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        TMA: tl.constexpr):
    if TMA:
        desc.store([b, t0, c0], y.to(desc.dtype).reshape(1, BLOCK_T, BLOCK_C))
    else:
        tl.store(_tile_ptrs(base, t, stride, offs_c), y.to(base.dtype.element_ty), mask=(t < L)[:, None])


@triton.jit
def _z(kb, vb, kd, vd, b, t0, t, skl, svl, offs_c, c0, L, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
       TMA: tl.constexpr):
    """``z = k * v`` of one chunk tile, fp32."""
    return (_ld(kb, kd, b, t0, t, skl, offs_c, c0, L, BLOCK_T, BLOCK_C, TMA)
            * _ld(vb, vd, b, t0, t, svl, offs_c, c0, L, BLOCK_T, BLOCK_C, TMA))


@triton.jit
def _second_spill_block(h_row, K, BLOCK_T: tl.constexpr, dt: tl.constexpr, DOT_F32: tl.constexpr):
    """``H2[i, j] = h[i - j + 2 b]``: the taps that reach two chunks back (needed when ``b < K <= 2 b``)."""
    offs = tl.arange(0, BLOCK_T)
    d = offs[:, None] - offs[None, :] + 2 * BLOCK_T
    return _to_dot(tl.load(h_row + d, mask=d < K, other=0.0), dt, DOT_F32)


@triton.jit
def _group_step(H0, H1, H2, x_prev, x_prev2, qb, kb, vb, yb, qd, kd, vd, yd, bias_ptr, b, t0, t, sql, skl, svl, syl,
                offs_c, c0, L, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                TMA: tl.constexpr, THREE: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """One chunk of one group: ``y = q * (H0 X_n + H1 X_{n-1} [+ H2 X_{n-2}] + Dskip z)`` stored; returns
    ``X_n``."""
    z = _z(kb, vb, kd, vd, b, t0, t, skl, svl, offs_c, c0, L, BLOCK_T, BLOCK_C, TMA)
    x = _to_dot(z, qb.dtype.element_ty, DOT_F32)
    acc = tl.dot(H1, x_prev, tl.dot(H0, x, input_precision=PREC), input_precision=PREC)
    if THREE:
        acc = tl.dot(H2, x_prev2, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c).to(tl.float32)[None, :] * z
    y = _ld(qb, qd, b, t0, t, sql, offs_c, c0, L, BLOCK_T, BLOCK_C, TMA) * acc
    _st(yb, yd, b, t0, t, syl, offs_c, c0, L, y, BLOCK_T, BLOCK_C, TMA)
    return x


@triton.jit
def _tiles_fwd_kernel(q_ptr, k_ptr, v_ptr, h_ptr, bias_ptr, y_ptr, qd, kd, vd, yd,
                      L, DG, K, n_chunks, chunks_per_prog, n_seg, sqb, sql, skb, skl, svb, svl, syb, syl,
                      HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PAIR: tl.constexpr,
                      TMA: tl.constexpr, THREE: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``tma`` (one group, descriptor loads), ``pair`` (groups ``2 p`` and ``2 p + 1`` side by side) and, with
    THREE, their forms with three blocks per group (chunks of ``b >= K / 2``, a third of the blocks' memory)."""
    pid_c = tl.program_id(0)
    pid = tl.program_id(1)
    bi = pid // n_seg
    b = bi.to(tl.int64)
    seg = pid % n_seg
    ca = pid_c * (2 if PAIR else 1) * BLOCK_C
    cb = ca + BLOCK_C
    dt = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    oa = ca + tl.arange(0, BLOCK_C)
    ob = cb + tl.arange(0, BLOCK_C)
    A0, A1 = _toeplitz_blocks(h_ptr + (ca // DG) * K, K, BLOCK_T, False, dt, DOT_F32)
    A2 = _second_spill_block(h_ptr + (ca // DG) * K, K, BLOCK_T, dt, DOT_F32) if THREE else A1
    if PAIR:
        B0, B1 = _toeplitz_blocks(h_ptr + (cb // DG) * K, K, BLOCK_T, False, dt, DOT_F32)
        B2 = _second_spill_block(h_ptr + (cb // DG) * K, K, BLOCK_T, dt, DOT_F32) if THREE else B1
    qb, kb, vb, yb = q_ptr + b * sqb, k_ptr + b * skb, v_ptr + b * svb, y_ptr + b * syb
    n0 = seg * chunks_per_prog
    n1 = tl.minimum(n0 + chunks_per_prog, n_chunks)
    t0 = (n0 - 1) * BLOCK_T
    t = t0 + offs_t
    xa_prev = _to_dot(_z(kb, vb, kd, vd, bi, t0, t, skl, svl, oa, ca, L, BLOCK_T, BLOCK_C, TMA), dt, DOT_F32)
    xa_prev2 = _to_dot(_z(kb, vb, kd, vd, bi, t0 - BLOCK_T, t - BLOCK_T, skl, svl, oa, ca, L, BLOCK_T, BLOCK_C,
                          TMA), dt, DOT_F32) if THREE else xa_prev
    if PAIR:
        xb_prev = _to_dot(_z(kb, vb, kd, vd, bi, t0, t, skl, svl, ob, cb, L, BLOCK_T, BLOCK_C, TMA), dt, DOT_F32)
        xb_prev2 = _to_dot(_z(kb, vb, kd, vd, bi, t0 - BLOCK_T, t - BLOCK_T, skl, svl, ob, cb, L, BLOCK_T,
                              BLOCK_C, TMA), dt, DOT_F32) if THREE else xb_prev
    for n in range(n0, n1):
        t0 = n * BLOCK_T
        t = t0 + offs_t
        xa = _group_step(A0, A1, A2, xa_prev, xa_prev2, qb, kb, vb, yb, qd, kd, vd, yd, bias_ptr, bi, t0, t, sql,
                         skl, svl, syl, oa, ca, L, HAS_BIAS, BLOCK_T, BLOCK_C, TMA, THREE, PREC, DOT_F32)
        xa_prev2 = xa_prev
        xa_prev = xa
        if PAIR:
            xb = _group_step(B0, B1, B2, xb_prev, xb_prev2, qb, kb, vb, yb, qd, kd, vd, yd, bias_ptr, bi, t0, t,
                             sql, skl, svl, syl, ob, cb, L, HAS_BIAS, BLOCK_T, BLOCK_C, TMA, THREE, PREC, DOT_F32)
            xb_prev2 = xb_prev
            xb_prev = xb


@triton.jit
def _group_view(x, BLOCK_T: tl.constexpr, NG: tl.constexpr, DG: tl.constexpr, SPLIT: tl.constexpr):
    """``[b, NG * dg]`` -> ``[b, dg, NG]`` (to split in halves) or ``[NG, b, dg]`` (batched products)."""
    if SPLIT:
        return tl.permute(tl.reshape(x, (BLOCK_T, NG, DG)), (0, 2, 1))
    else:
        return tl.permute(tl.reshape(x, (BLOCK_T, NG, DG)), (1, 0, 2))


@triton.jit
def _wide_fwd_kernel(q_ptr, k_ptr, v_ptr, h_ptr, bias_ptr, y_ptr,
                     L, K, n_chunks, chunks_per_prog, n_seg, sqb, sql, skb, skl, svb, svl, syb, syl,
                     HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr,
                     SPLIT: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``NG`` groups per program on one ``[b, NG * dg]`` tile: ``batched`` products, or (``SPLIT``, NG = 2)
    one 2D product per half after ``tl.split``."""
    BLOCK_C: tl.constexpr = NG * DG
    pid_c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    c0 = pid_c * BLOCK_C
    dt = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    g0 = c0 // DG
    if SPLIT:
        A0, A1 = _toeplitz_blocks(h_ptr + g0 * K, K, BLOCK_T, False, dt, DOT_F32)
        B0, B1 = _toeplitz_blocks(h_ptr + (g0 + 1) * K, K, BLOCK_T, False, dt, DOT_F32)
    else:
        d = (offs_t[:, None] - offs_t[None, :])[None, :, :]
        rows = h_ptr + (g0 + tl.arange(0, NG)).to(tl.int64)[:, None, None] * K
        H0 = _to_dot(tl.load(rows + d, mask=(d >= 0) & (d < K), other=0.0), dt, DOT_F32)
        H1 = _to_dot(tl.load(rows + d + BLOCK_T, mask=(d + BLOCK_T) < K, other=0.0), dt, DOT_F32)
    qb, kb, vb, yb = q_ptr + b * sqb, k_ptr + b * skb, v_ptr + b * svb, y_ptr + b * syb
    n0 = seg * chunks_per_prog
    n1 = tl.minimum(n0 + chunks_per_prog, n_chunks)
    t = (n0 - 1) * BLOCK_T + offs_t
    x_prev = _to_dot(_load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L), dt, DOT_F32)
    x_prev = _group_view(x_prev, BLOCK_T, NG, DG, SPLIT)
    for n in range(n0, n1):
        t = n * BLOCK_T + offs_t
        z = _load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L)
        x = _group_view(_to_dot(z, dt, DOT_F32), BLOCK_T, NG, DG, SPLIT)
        if SPLIT:  # [b, dg, 2] -> two [b, dg] halves, one product each, joined back
            xa, xb = tl.split(x)
            pa, pb = tl.split(x_prev)
            ya = tl.dot(A1, pa, tl.dot(A0, xa, input_precision=PREC), input_precision=PREC)
            yb2 = tl.dot(B1, pb, tl.dot(B0, xb, input_precision=PREC), input_precision=PREC)
            acc = tl.reshape(tl.permute(tl.join(ya, yb2), (0, 2, 1)), (BLOCK_T, BLOCK_C))
        else:
            acc = tl.dot(H1, x_prev, tl.dot(H0, x, input_precision=PREC), input_precision=PREC)
            acc = tl.reshape(tl.permute(acc, (1, 0, 2)), (BLOCK_T, BLOCK_C))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c).to(tl.float32)[None, :] * z
        y = _load_tile(qb, t, sql, offs_c, L) * acc
        tl.store(_tile_ptrs(yb, t, syl, offs_c), y.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None])
        x_prev = x


# --------------------------------------------------------------------------------------------- launchers
def design_forward(design: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                   bias: torch.Tensor | None, block_t: int, num_warps: int = 4, num_stages: int = 3,
                   groups: int = 2, target_programs: int = 1024) -> tuple[torch.Tensor, Callable[[], None]]:
    """Output buffer and launch closure of one alternative design (contiguous ``[B, L, D]`` inputs)."""
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    y = torch.empty_like(q)
    per_prog = {"tma": 1, "pair": 2, "split": 2, "batched": groups, "three": 1, "three_pair": 2}[design]
    if design.startswith("three") and not block_t < K <= 2 * block_t:
        raise ValueError(f"design {design}: three blocks need b < K <= 2 b (K = {K}, b = {block_t})")
    n_cb = D // (per_prog * dg)
    n_chunks = triton.cdiv(L, block_t)
    cpp, n_seg = split_segments(n_chunks, n_cb, target_programs)
    strides = [s for x in (q, k, v, y) for s in (x.stride(0), x.stride(1))]
    meta = dict(HAS_BIAS=bias is not None, BLOCK_T=block_t, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                DOT_F32=interpreted(), num_warps=num_warps, num_stages=num_stages)
    grid = (n_cb, B * n_seg)
    if design in ("tma", "pair", "three", "three_pair"):
        if design == "tma":
            from triton.tools.tensor_descriptor import TensorDescriptor

            descs = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_t, dg]) for x in (q, k, v, y)]
        else:
            descs = [None] * 4

        def launch() -> None:
            _tiles_fwd_kernel[grid](q, k, v, h, bias, y, *descs, L, dg, K, n_chunks, cpp, n_seg, *strides,
                                    BLOCK_C=dg, PAIR=design.endswith("pair"), TMA=design == "tma",
                                    THREE=design.startswith("three"), **meta)
    else:
        def launch() -> None:
            _wide_fwd_kernel[grid](q, k, v, h, bias, y, L, K, n_chunks, cpp, n_seg, *strides, DG=dg,
                                   NG=per_prog, SPLIT=design == "split", **meta)
    return y, launch


def production_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                       bias: torch.Tensor | None, config: fir.BlockedConfig) -> tuple[torch.Tensor, Callable[[], None]]:
    """Output buffer and launch closure of the production blocked kernel with one configuration."""
    p = fir.kernel_layout(q, k, v, h, bias)
    y = torch.empty_like(q)
    return y, lambda: fir._forward(p, y, config)


def variants(design: str, K: int) -> list[dict[str, Any]]:
    """Launch settings timed per design (chunk length, warps, pipelining depth)."""
    bts = [128] if K > 64 else [32, 64]
    if design.startswith("three"):  # b < K <= 2 b: half the chunk of the two-block designs
        bts = [bt for bt in (16, 32, 64) if bt < K <= 2 * bt]
    if design == "production":
        cands = fir._blocked_candidates(K, False, False)
        return [{"config": c} for c in (*cands, dataclasses.replace(cands[0], channel_fast=False))]
    if design == "batched":
        return [dict(block_t=bt, num_warps=nw, groups=g) for bt in bts for nw in (4, 8) for g in (2, 4)]
    return [dict(block_t=bt, num_warps=nw, num_stages=ns) for bt in bts for nw in (4, 8) for ns in (2, 3)]


def _inputs(B: int, L: int, D: int, K: int, bias: bool, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, D, generator=gen).to(device, dtype) for _ in range(3))
    h = (torch.randn(D // 16, K, generator=gen) / math.sqrt(K)).to(device)
    b = torch.randn(D, generator=gen).to(device) if bias else None
    return q, k, v, h, b


def check_designs(device: torch.device, designs: tuple[str, ...] = DESIGNS[1:]) -> dict[str, float]:
    """Relative max error of every design against the float64 reference: fp32, a long filter (K = 64, b = 64,
    or b = 32 with three blocks; fp32 blocks of b = 128 exceed shared memory) and a short one (K = 7, two-block
    designs only), L not a chunk multiple, batch 2 (so that chunks at the start of a sequence see no tokens of
    the previous row)."""
    errs = {}
    for K, bias, bt_default in ((64, True, 64), (7, False, 32)):
        bt = bt_default
        q, k, v, h, b = _inputs(2, 300 if K > 32 else 75, 64, K, bias, torch.float32, device, seed=K)
        y64 = reference.gated_fir_conv_ref(*(x.double() if x is not None else None for x in (q, k, v, h, b)))
        for design in designs:
            if design.startswith("three"):
                if K <= 16:  # b < K <= 2 b needs b < 16, below the tensor cores' smallest tile
                    continue
                bt = K // 2
            else:
                bt = bt_default
            y, launch = design_forward(design, q, k, v, h, b, bt, target_programs=4)
            launch()
            errs[f"{design} K={K}"] = ((y.double() - y64).abs().max() / y64.abs().max()).item()
    return errs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    p.add_argument("--lengths", default="8192,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}")
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds for the timings (0: unlimited)")
    p.add_argument("--out", default="", help="JSON results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    designs = tuple(d for d in args.designs.split(",") if d)
    unknown = set(designs) - set(DESIGNS)
    if unknown:
        p.error(f"--designs: unknown {sorted(unknown)}; choose from {', '.join(DESIGNS)}")
    result: dict[str, Any] = {**run_info(device), "check": check_designs(device, tuple(d for d in designs
                                                                                     if d != "production"))}
    for name, err in result["check"].items():
        print(f"check {name:<16} max rel err {err:.2e} ({'ok' if err < 1e-5 else 'FAILED'})")
    if device.type != "cuda":
        print("timings need a GPU: correctness checked only")
        write_json(args.out, result)
        return 0 if all(e < 1e-5 for e in result["check"].values()) else 1
    copy = copy_bandwidth_gbps(device)
    result.update(copy_gbps=copy, rows=[])
    budget = Budget(args.time_budget or None)
    D = 4096
    for K, bias in ((128, True), (7, False)):
        for L in (int(x) for x in args.lengths.split(",")):
            q, k, v, h, b = _inputs(1, L, D, K, bias, torch.bfloat16, device)
            ref = fir.fir_forward(q, k, v, h, b, blocked=True, config=fir._blocked_candidates(K, False, False)[0])
            floor_ms = 4 * L * D * 2 / copy / 1e6
            for design in designs:
                for var in variants(design, K):
                    if not budget.allows(5):
                        break
                    row = dict(K=K, L=L, design=design, settings=str(var.get("config", var)))
                    try:
                        if design == "production":
                            y, launch = production_forward(q, k, v, h, b, var["config"])
                        else:
                            y, launch = design_forward(design, q, k, v, h, b, **var)
                        launch()
                        row["err"] = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        row["ms"] = bench_ms(launch, device, rep_ms=50)
                        row["copy_frac"] = floor_ms / row["ms"]
                    except Exception as e:  # a variant that does not fit shared memory is recorded, not fatal
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    result["rows"].append(row)
            write_json(args.out, result)
            del q, k, v
            torch.cuda.empty_cache()
    best: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = (r["K"], r["L"], r["design"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print_table(f"Blocked FIR forward designs, best setting each (ms; D = 4096, bf16; copy {copy:.0f} GB/s)",
                ["K", "L", "design", "ms", "% of copy", "settings"],
                [(k[0], k[1], k[2], f"{r['ms']:.4f}", f"{100 * r['copy_frac']:.0f}%", r["settings"])
                 for k, r in sorted(best.items())])
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
