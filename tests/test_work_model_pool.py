"""The pooling work model (benchmarks/work_model_pool.py) against what the kernels execute.

Every pooling launch runs under the Triton interpreter on small shapes with the GPU's tile
configurations, while the interpreter's builder records each ``tl.dot`` (operand shapes), each
masked load (the addresses it really reads, per program) and each store. The model, computed
from the same launch plans, must give exactly the recorded MMA FLOPs, the recorded load + store
bytes and, for several residency values ``R``, the HBM bytes of an independent replay of the
recorded addresses under the model's rule (a load misses unless the same program or one of the
previous ``R`` programs in launch order loaded that address).
"""
import os
import sys

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from pargo_kernels.ops import pool_triton as pt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import work_model_pool as wm  # noqa: E402


class Recorder:
    """Patches the interpreter's builder; one record per launch (``set_grid_dim``)."""

    def __init__(self, monkeypatch):
        self.launches = []
        rec = self
        builder = interpreter.InterpreterBuilder
        real_dim, real_dot = builder.set_grid_dim, builder.create_dot
        real_load, real_store = builder.create_masked_load, builder.create_masked_store

        def set_grid_dim(self, nx, ny, nz):
            rec.launches.append(dict(grid=(nx, ny, nz), dots=[], loads=[], stored=0))
            return real_dim(self, nx, ny, nz)

        def program(self):
            x, y, _ = self.grid_idx
            return x + self.grid_dim[0] * y

        def create_dot(self, a, b, d, *args):
            rec.launches[-1]["dots"].append((*a.data.shape, b.data.shape[-1]))
            return real_dot(self, a, b, d, *args)

        def create_masked_load(self, ptrs, mask, *args):
            item = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            addr = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
            rec.launches[-1]["loads"].append((program(self), addr.astype(np.int64), item))
            return real_load(self, ptrs, mask, *args)

        def create_masked_store(self, ptrs, value, mask, *args):
            item = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            rec.launches[-1]["stored"] += int(np.broadcast_to(mask.data, ptrs.data.shape)
                                              .sum()) * item
            return real_store(self, ptrs, value, mask, *args)

        for name, fn in (("set_grid_dim", set_grid_dim), ("create_dot", create_dot),
                         ("create_masked_load", create_masked_load),
                         ("create_masked_store", create_masked_store)):
            monkeypatch.setattr(builder, name, fn)


def replay_hbm(loads, R) -> int:
    """Independent replay of the residency rule over the recorded element addresses."""
    last, total = {}, 0
    for prog, addrs, item in sorted(loads, key=lambda ev: ev[0]):
        for a in addrs.tolist():
            if a not in last or last[a] < prog - R:
                total += item
            last[a] = max(last.get(a, -1), prog)
    return total


RECORDS = pytest.mark.interpreter(reason="records the builder calls of Triton's interpreter")

CASES = {  # id: (B, in_grid, out_grid, C, NF)
    "divisible": (3, (6, 6), (3, 3), 72, 80),
    "overlap": (2, (7, 7), (3, 3), 40, 48),
    "upsample": (2, (3, 2), (4, 3), 24, 40),
}


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU's tile configs (small tiles: many programs on small shapes)."""
    pool_cfg, gemm_cfg = pt.pool_config, pt.gemm_config
    monkeypatch.setattr(pt, "pool_config", lambda c, interpret=False: pool_cfg(c))
    monkeypatch.setattr(pt, "gemm_config", lambda d, interpret=False: gemm_cfg(d))


def _run(op, B, in_grid, out_grid, C, NF, dtype):
    """Run one op's launcher; return its plan (the launches it made)."""
    nin, nout = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
    x = torch.randn(B, nin, C).to(dtype)
    w = torch.randn(NF, C).to(dtype)
    if op == "pool-fwd":
        pt.pool_forward(x, in_grid, out_grid)
        return pt.pool_fwd_plan(B, C, in_grid, out_grid, dtype, True)
    if op == "pool-bwd":
        pt.pool_backward(torch.randn(B, nout, C).to(dtype), in_grid, out_grid)
        return pt.pool_bwd_plan(B, C, in_grid, out_grid, dtype, True)
    if op == "project-fwd":
        pt.pool_project_forward(x, w, torch.randn(NF).to(dtype), in_grid, out_grid)
        return pt.pool_project_fwd_plan(B, C, NF, in_grid, out_grid, dtype, True, True)
    pt.pool_project_backward(torch.randn(B, nout, NF).to(dtype), x, w, True, in_grid, out_grid)
    return pt.pool_project_bwd_plan(B, C, NF, in_grid, out_grid, dtype, True, True)


@RECORDS
@pytest.mark.parametrize("op", ["pool-fwd", "pool-bwd", "project-fwd", "project-bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_recorded_execution(op, case, gpu_tiles, monkeypatch):
    B, in_grid, out_grid, C, NF = CASES[case]
    rec = Recorder(monkeypatch)
    plan = _run(op, B, in_grid, out_grid, C, NF, torch.float32)
    assert len(rec.launches) == len(plan) > 0
    for launch, got in zip(plan, rec.launches):
        assert got["grid"][:len(launch.grid)] == tuple(launch.grid)
        executed = sum(2 * m * n * k for m, k, n in got["dots"])
        assert wm.launch_flops(launch) == executed, launch.kernel.fn.__name__
        for R in (0, 1, 3, 10 ** 6):
            model = wm.launch_model(launch, B, in_grid, out_grid, 4, R)
            loaded = sum(len(a) * item for _, a, item in got["loads"])
            assert model["bytes_loaded"] == loaded + got["stored"], (launch.label, R)
            assert model["bytes_requested"] == replay_hbm(got["loads"], R) + got["stored"], \
                (launch.kernel.fn.__name__, R)


@RECORDS
def test_dots_counted_in_bf16_with_interpreter_tiles(monkeypatch):
    """The interpreter's own (larger) tiles and the bf16 path: the same count."""
    rec = Recorder(monkeypatch)
    plan = _run("project-bwd", 2, (6, 6), (3, 3), 40, 72, torch.bfloat16)
    executed = sum(2 * m * n * k for la in rec.launches for m, k, n in la["dots"])
    assert executed == sum(wm.launch_flops(la) for la in plan) > 0


def test_residency_from_resources():
    # 128 regs x 4 warps: 16K regs a block -> 4 blocks by registers; 8 KB smem allows 25
    assert wm.resident_programs(128, 8192, 4) == 132 * 4
    # shared memory binds: 100 KB + 1 KB reserved -> 2 blocks
    assert wm.resident_programs(32, 100 * 1024, 4) == 132 * 2
    # 255 regs: 8192 a warp (rounded to 256) -> 8 warps -> 2 blocks of 4 warps
    assert wm.resident_programs(255, 0, 4) == 132 * 2


def test_deco_rows_meet_the_targets_and_pick_the_default():
    """deco (B=256, 24x24 -> 12x12, C=1024 -> 4096, bf16): the default pool_project forward
    requests <= 1.3x its HBM floor, and the fused kernel is the default only if the model shows
    it at least as cheap as pool + matmul on every count it has."""
    rows = {(r["op"], r["pass"], r["variant"]): r for r in wm.pool_rows(cases=["deco"])}
    assert {k for k in rows} >= {("pool", "fwd", "triton"), ("pool", "bwd", "triton")}
    default = [r for (op, pss, _), r in rows.items() if op == "pool_project" and pss == "fwd"
               and r["default"]]
    assert len(default) == 1 and default[0]["bytes_requested"] <= 1.3 * default[0]["bytes_floor"]
    fused, unfused = rows["pool_project", "fwd", "fused"], rows["pool_project", "fwd",
                                                                 "pool+matmul"]
    cheaper = all(fused[k] <= unfused[k] for k in ("bytes_requested", "bytes_loaded",
                                                   "pool_adds_issued", "flops_issued"))
    assert fused["default"] == cheaper
    for r in rows.values():
        assert r["flops_flex128"] is None and r["flops_ideal"] == r["flops_dense"]
        assert r["flops_issued"] >= r["flops_ideal"] and r["bytes_requested"] >= r["bytes_floor"]
