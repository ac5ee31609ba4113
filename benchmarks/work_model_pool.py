"""Work model of the pooling kernels: FLOPs issued and HBM bytes requested, without a GPU.

    python benchmarks/work_model_pool.py [--json PATH] [--refresh-aot]

Rows for ops ``pool`` (``adaptive_avg_pool_tokens``) and ``pool_project``
(``adaptive_avg_pool_project``), passes ``fwd`` and ``bwd``, on the benchmark cases of
``bench_pooling.py`` (``deco``: B=256, 24x24 -> 12x12, C=1024 -> 4096; ``siglip``: 27x27 ->
12x12, C=1152 -> 4096; bf16). Everything about our kernels comes from the launch plans of
``pargo_kernels/ops/pool_triton.py`` (the very ``Launch`` objects the launchers run: grid, tile
config, per-program trip counts, launch order); what this file adds is each kernel's access
pattern (which rows / columns a program loads), written from the kernel bodies.

THIS IS A MODEL, NOT A TIMING. Assumptions:

* FLOPs are MMA FLOPs (``tl.dot``): ``2*m*n*k`` per dot of the tile shape, masked lanes
  included (``flops_issued``; tests/test_work_model_pool.py checks it against the dots the
  interpreter executes). ``flops_ideal`` = ``flops_dense`` = the pool-then-GEMM FLOPs
  (pooling has no sparsity, so both are the GEMM of the pooled tensor); ``flops_flex128`` is
  None: FlexAttention's block-sparse tiles do not apply to pooling. The pooling adds are not
  FLOPs here; ``pool_adds_issued`` counts them (every lane of every window iteration).
* ``bytes_floor``: every input read once, every output written once.
* ``bytes_requested``: stores once each; a load is an HBM read unless the same bytes were
  already loaded by that program or by one of the previous ``R`` programs in launch order
  (``program = pid0 + grid0 * pid1``), ``R`` = programs of that configuration resident at
  once on an H100 (132 SMs; per SM 228 KB shared memory with 1 KB reserved per block, 64K
  registers allocated 256 per warp, 64 warps, 32 blocks), from the registers and shared
  memory of the sm_90 AOT compile (``benchmarks/results/aot_pool_sm90.json``). Launches are
  modelled one at a time (no reuse across launches). ``bytes_loaded``: all loads, cache hits
  included (the traffic into the SMs).
* Library steps of the ``pool+matmul`` variant (``torch.matmul`` / ``F.linear``, the bias
  gradient's sum) are modelled at their own floor in HBM (operands read once, result written
  once) with FLOPs = ideal; their ``bytes_loaded`` assume 128x128 output tiles (A re-loaded
  once per 128 columns, B once per 128 rows). They have no programs in the counts.
* ``programs``, ``max/mean_iters_per_program``: over our kernels' programs; an iteration is
  one execution of the innermost loop body (one load of a window offset's tile).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import bench_pooling  # noqa: E402
from pargo_kernels import pooling  # noqa: E402
from pargo_kernels.ops import pool_triton as pt  # noqa: E402

AOT_JSON = os.path.join(HERE, "results", "aot_pool_sm90.json")
H100 = dict(sms=132, smem=228 * 1024, smem_reserved=1024, regs=65536, reg_unit=256,
            warps=64, blocks=32)
DTYPE = torch.bfloat16
CASES = {"deco": bench_pooling.SHAPES[0], "siglip": bench_pooling.SHAPES[1]}


# --------------------------------------------------------------------------------------------
# residency (R) from the AOT compile
# --------------------------------------------------------------------------------------------
def refresh_aot(path: str = AOT_JSON) -> None:
    """Recompile every pooling configuration for sm_90 (``python -m pargo_kernels.aot``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE)
    subprocess.run([sys.executable, "-m", "pargo_kernels.aot", "--arch", "90", "--filter",
                    "_kernel pool ", "_kernel pool-proj ", "--json", path],  # not the varlen ones
                   check=True, env=env, stdout=subprocess.DEVNULL)


def load_resources(path: str = AOT_JSON) -> dict:
    with open(path) as f:
        return {(r["kernel"], r["config"]): r for r in json.load(f)}


def resident_programs(regs: int, smem: int, warps: int) -> int:
    """Blocks resident at once on an H100 for one configuration."""
    per_warp = -(-regs * 32 // H100["reg_unit"]) * H100["reg_unit"]
    per_sm = min(H100["blocks"], H100["warps"] // warps,
                 (H100["regs"] // per_warp) // warps,
                 H100["smem"] // (smem + H100["smem_reserved"]))
    return H100["sms"] * per_sm


def residency(launch, resources) -> int:
    key = (launch.kernel.fn.__name__, launch.label)
    if key not in resources:
        raise KeyError(f"no AOT resources for {key}: run with --refresh-aot")
    r = resources[key]
    return resident_programs(r["registers"], r["shared_bytes"], launch.meta["num_warps"])


# --------------------------------------------------------------------------------------------
# access patterns
# --------------------------------------------------------------------------------------------
def _widths(total: int, block: int, n: int) -> np.ndarray:
    return np.minimum(block, total - block * np.arange(n))


def gather_pattern(B, row_grid, src_grid, n_rows, block_rows):
    """Program footprints of a window gather: row ``m = b*Nr + ry*Wr + rx`` reads source cells
    ``(b, sy, sx)``, ``sy`` in ``[floor(ry*Hs/Hr), ceil((ry+1)*Hs/Hr))`` (same for x), as
    ``_pooled_tile`` / ``_pool_bwd_kernel`` do. Sources are grouped into atoms: sets of cells
    read by exactly the same row tiles (a program then reads whole atoms).

    Returns ``(pair_tile, pair_atom, atom_cells, loads_per_tile)``: the (row tile, atom) pairs,
    the cells of each atom, and the cell loads (duplicates included) of each row tile."""
    (hr, wr), (hs, ws) = row_grid, src_grid
    m = np.arange(n_rows)
    b, o = m // (hr * wr), m % (hr * wr)
    ry, rx = o // wr, o % wr
    y0, y1 = ry * hs // hr, -(-(ry + 1) * hs // hr)
    x0, x1 = rx * ws // wr, -(-(rx + 1) * ws // wr)
    ky, kx = pt.max_span(hs, hr), pt.max_span(ws, wr)
    y = y0[:, None, None] + np.arange(ky)[None, :, None]
    x = x0[:, None, None] + np.arange(kx)[None, None, :]
    ok = (y < y1[:, None, None]) & (x < x1[:, None, None])
    src = (b[:, None, None] * (hs * ws) + y * ws + x)[ok]
    tile = np.broadcast_to((m // block_rows)[:, None, None], ok.shape)[ok]
    loads_per_tile = np.bincount(tile, minlength=-(-n_rows // block_rows))
    pairs = np.unique(np.stack([src, tile], 1), axis=0)  # sorted by source, then tile
    src, tile = pairs[:, 0], pairs[:, 1]
    starts = np.r_[0, np.flatnonzero(np.diff(src)) + 1]
    counts = np.diff(np.r_[starts, len(src)])
    members = np.full((len(starts), counts.max()), -1)
    members[np.repeat(np.arange(len(starts)), counts), np.arange(len(src)) -
            np.repeat(starts, counts)] = tile
    atoms, atom_cells = np.unique(members, axis=0, return_counts=True)
    a_idx, slot = np.nonzero(atoms >= 0)
    return atoms[a_idx, slot], a_idx, atom_cells, loads_per_tile


def hbm_read_bytes(prog, key, nbytes, R) -> int:
    """Bytes of the loads that miss: no earlier load of the same key by the same program or
    one of the previous ``R`` programs in launch order."""
    order = np.lexsort((prog, key))
    prog, key, nbytes = prog[order], key[order], nbytes[order]
    hit = np.r_[False, (key[1:] == key[:-1]) & (prog[:-1] >= prog[1:] - R)]
    return int(nbytes[~hit].sum())


def _events(launch, row_tiles, keys, nbytes, per_column, col_bytes=None):
    """Loads of every program ``(r, j)`` of ``launch`` for footprint entries ``(row tile r,
    key, bytes)``; ``per_column``: the entry is loaded per column tile (key and bytes scaled by
    ``col_bytes[j]``), else the same bytes by every column tile."""
    n_cols = launch.tiles[1]
    j = np.arange(n_cols)
    prog = launch.program(row_tiles[:, None], j[None, :]).ravel()
    if per_column:
        key = (keys[:, None] * n_cols + j[None, :]).ravel()
        nb = (nbytes[:, None] * col_bytes[None, :]).ravel()
    else:
        key = np.broadcast_to(keys[:, None], (len(keys), n_cols)).ravel()
        nb = np.broadcast_to(nbytes[:, None], (len(keys), n_cols)).ravel()
    return prog, key, nb


def _col_events(launch, keys_per_col, nbytes_per_col):
    """Loads that depend only on the column tile ``j`` (every row tile's program loads them)."""
    r = np.arange(launch.tiles[0])
    j = np.arange(launch.tiles[1])
    prog = launch.program(r[:, None], j[None, :]).ravel()
    return (prog, np.broadcast_to(keys_per_col[None, :], (len(r), len(j))).ravel(),
            np.broadcast_to(nbytes_per_col[None, :], (len(r), len(j))).ravel())


def launch_model(launch, B, in_grid, out_grid, e, R) -> dict:
    """FLOPs, pooling adds, loads (all / HBM) and stores of one launch."""
    name = launch.kernel.fn.__name__
    s, meta = launch.sizes, launch.meta
    n_r, n_c = launch.tiles
    programs = n_r * n_c
    streams, stored, adds = [], 0, 0
    if name in ("_pool_fwd_kernel", "_pool_bwd_kernel"):
        fwd = name == "_pool_fwd_kernel"
        rows_grid, src_grid = (out_grid, in_grid) if fwd else (in_grid, out_grid)
        tiles, atoms, cells, loads = gather_pattern(B, rows_grid, src_grid, s["M"],
                                                    meta["BLOCK_M"])
        width = _widths(s["C"], meta["BLOCK_C"], n_c) * e
        streams.append(_events(launch, tiles, atoms, cells[atoms], True, width))
        loaded = int(loads.sum()) * s["C"] * e
        stored = s["M"] * s["C"] * e
        adds = programs * launch.iters * meta["BLOCK_M"] * meta["BLOCK_C"]
    elif name == "_pool_proj_fwd_kernel":
        tiles, atoms, cells, loads = gather_pattern(B, out_grid, in_grid, s["M"],
                                                    meta["BLOCK_M"])
        C, NF = s["C"], s["NF"]
        streams.append(_events(launch, tiles, atoms, cells[atoms] * C * e, False))
        wf = _widths(NF, meta["BLOCK_N"], n_c)
        streams.append(_col_events(launch, np.arange(n_c), wf * C * e))
        loaded = int(loads.sum()) * C * e * n_c + n_r * NF * C * e
        if meta["HAS_BIAS"]:
            streams.append(_col_events(launch, np.arange(n_c), wf * e))
            loaded += n_r * NF * e
        stored = s["M"] * NF * e
        adds = programs * launch.iters * meta["BLOCK_M"] * meta["BLOCK_K"]
    elif name in ("_pool_proj_dw_kernel", "_pool_proj_dp_kernel"):
        M, C, NF = s["M"], s["C"], s["NF"]
        if name == "_pool_proj_dw_kernel":  # rows: features, columns: channels; loops over M
            row_bytes = _widths(NF, meta["BLOCK_M"], n_r) * M * e     # dY column tile
            col_bytes = _widths(C, meta["BLOCK_N"], n_c) * M * e      # P column tile
            stored = (NF * C + (NF if meta["HAS_BIAS"] else 0)) * e
        else:  # rows: pooled rows, columns: channels; loops over NF
            row_bytes = _widths(M, meta["BLOCK_M"], n_r) * NF * e     # dY row tile
            col_bytes = _widths(C, meta["BLOCK_N"], n_c) * NF * e     # W column tile
            stored = M * C * e
        r = np.arange(n_r)
        streams.append(_events(launch, r, r, row_bytes, False))
        streams.append(_col_events(launch, np.arange(n_c), col_bytes))
        loaded = int(row_bytes.sum()) * n_c + int(col_bytes.sum()) * n_r
    else:
        raise NotImplementedError(f"no access pattern for {name}")
    hbm = sum(hbm_read_bytes(*ev, R) for ev in streams)
    return dict(kernel=name, label=launch.label, grid=list(launch.grid), R=R,
                programs=programs, iters=launch.iters, flops=launch_flops(launch), pool_adds=adds,
                bytes_loaded=loaded + stored, bytes_requested=hbm + stored)


def launch_flops(launch) -> int:
    """MMA FLOPs one launch issues: one ``BLOCK_M x BLOCK_N x BLOCK_K`` dot per reduction step
    of every program (the fused forward's step also runs ``KH*KW`` window loads)."""
    name, meta, s = launch.kernel.fn.__name__, launch.meta, launch.sizes
    if name in ("_pool_fwd_kernel", "_pool_bwd_kernel"):
        return 0
    dots = launch.iters // (s["KH"] * s["KW"]) if name == "_pool_proj_fwd_kernel" else launch.iters
    return (launch.tiles[0] * launch.tiles[1] * dots *
            2 * meta["BLOCK_M"] * meta["BLOCK_N"] * meta["BLOCK_K"])


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
GEMM_TILE = 128


def _library_step(name, flops, read, write, gemm=None) -> dict:
    """A cuBLAS / ATen step at its HBM floor; ``gemm=(m, n, a_bytes, b_bytes)``: loads of a
    ``GEMM_TILE``-square tiled GEMM (A once per column tile, B once per row tile)."""
    loaded = read
    if gemm is not None:
        m, n, a_bytes, b_bytes = gemm
        loaded = a_bytes * -(-n // GEMM_TILE) + b_bytes * -(-m // GEMM_TILE)
    return dict(kernel=name, flops=flops, pool_adds=0, bytes_loaded=loaded + write,
                bytes_requested=read + write, programs=0)


def _row(op, case, pss, variant, default, steps, flops_ideal, floor) -> dict:
    ours = [s for s in steps if s["programs"]]
    programs = sum(s["programs"] for s in ours)
    return dict(op=op, case=case, **{"pass": pss}, variant=variant, default=default,
                dtype=str(DTYPE).replace("torch.", ""),
                flops_issued=sum(s["flops"] for s in steps), flops_ideal=flops_ideal,
                flops_dense=flops_ideal, flops_flex128=None,
                bytes_floor=floor, bytes_requested=sum(s["bytes_requested"] for s in steps),
                bytes_loaded=sum(s["bytes_loaded"] for s in steps),
                pool_adds_issued=sum(s["pool_adds"] for s in steps), programs=programs,
                max_iters_per_program=max((s["iters"] for s in ours), default=0),
                mean_iters_per_program=(sum(s["iters"] * s["programs"] for s in ours) /
                                        programs if programs else 0.0),
                steps=steps)


def pool_rows(resources=None, cases=None) -> list[dict]:
    """The model's rows (see the module docstring), one per op x case x pass x variant."""
    resources = load_resources() if resources is None else resources
    e = DTYPE.itemsize
    fused_default = pooling.FUSED_DEFAULT
    rows = []
    for case in cases or CASES:
        _, B, in_grid, out_grid, C, NF = CASES[case]
        nin, nout = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
        M = B * nout

        def model(plan):
            return [launch_model(la, B, in_grid, out_grid, e, residency(la, resources))
                    for la in plan]
        pool_f = model(pt.pool_fwd_plan(B, C, in_grid, out_grid, DTYPE))
        pool_b = model(pt.pool_bwd_plan(B, C, in_grid, out_grid, DTYPE))
        x_b, p_b, w_b, y_b, bias_b = B * nin * C * e, M * C * e, NF * C * e, M * NF * e, NF * e
        rows += [_row("pool", case, "fwd", "triton", True, pool_f, 0, x_b + p_b),
                 _row("pool", case, "bwd", "triton", True, pool_b, 0, p_b + x_b)]
        gemm = 2 * M * C * NF
        fwd_floor = x_b + w_b + bias_b + y_b
        bwd_floor = y_b + x_b + w_b + x_b + w_b + bias_b
        fused_f = model(pt.pool_project_fwd_plan(B, C, NF, in_grid, out_grid, DTYPE, True))
        fused_b = model(pt.pool_project_bwd_plan(B, C, NF, in_grid, out_grid, DTYPE, True))
        unfused_f = pool_f + [_library_step("F.linear: P @ W^T + bias", gemm,
                                            p_b + w_b + bias_b, y_b, (M, NF, p_b, w_b))]
        unfused_b = [_library_step("dY @ W", gemm, y_b + w_b, p_b, (M, C, y_b, w_b)),
                     _library_step("dY^T @ P", gemm, y_b + p_b, w_b, (NF, C, y_b, p_b)),
                     _library_step("sum dY", 0, y_b, bias_b)] + pool_b
        for variant, fwd, bwd, default in (("fused", fused_f, fused_b, fused_default),
                                           ("pool+matmul", unfused_f, unfused_b,
                                            not fused_default)):
            rows += [_row("pool_project", case, "fwd", variant, default, fwd, gemm, fwd_floor),
                     _row("pool_project", case, "bwd", variant, default, bwd, 2 * gemm,
                          bwd_floor)]
    return rows


def markdown(rows) -> str:
    head = ["op", "case", "pass", "variant", "GFLOP issued", "GFLOP ideal", "MB floor",
            "MB requested", "x floor", "MB loaded", "pool adds G", "programs", "iters max/mean"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["op"], r["case"], r["pass"], r["variant"] + (" (default)" if r["default"] else ""),
            f"{r['flops_issued'] / 1e9:.1f}", f"{r['flops_ideal'] / 1e9:.1f}",
            f"{r['bytes_floor'] / 1e6:.0f}", f"{r['bytes_requested'] / 1e6:.0f}",
            f"{r['bytes_requested'] / r['bytes_floor']:.2f}", f"{r['bytes_loaded'] / 1e6:.0f}",
            f"{r['pool_adds_issued'] / 1e9:.2f}", str(r["programs"]),
            f"{r['max_iters_per_program']}/{r['mean_iters_per_program']:.0f}"]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="", help="write the rows to this JSON file")
    parser.add_argument("--refresh-aot", action="store_true",
                        help=f"recompile the pooling configs for sm_90 into {AOT_JSON}")
    args = parser.parse_args(argv)
    if args.refresh_aot or not os.path.exists(AOT_JSON):
        refresh_aot()
    rows = pool_rows()
    print("Work model (a model, not a timing; H100 residency, bf16):\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
