"""The work model counts exactly the MMA work the kernels execute.

Under the Triton interpreter every ``tl.dot`` goes through the interpreter builder's
``create_dot``; the test wraps it, records ``2 * M * N * K`` per call and attributes the calls to
the launch that made them, then compares with ``benchmarks/work_model.py``'s ``issued_flops`` for
the same shape: every mask kind, every pass and launch (forward, delta, split delta, dQ, dK/dV),
fp32 and 16-bit configurations, with and without key splits of the global tiles.
"""
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import pargo_kernels as pk
from pargo_kernels.ops import attention_plan as plan
from pargo_kernels.ops import attention_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import work_model  # noqa: E402

COUNTS_DOTS = pytest.mark.interpreter(reason="counts the tl.dot calls of Triton's interpreter")


def install_dot_counter(monkeypatch):
    """``(counts, current)``: every interpreted ``tl.dot`` adds ``2 * M * N * K`` to
    ``counts[current[0]]``."""
    from triton.runtime import interpreter
    counts = Counter()
    current = ["?"]
    # Patch the class, not the module's builder instance: undoing an instance patch would leave
    # the original bound method in the instance's __dict__, hiding later class-level patches
    # (tests/test_work_model_pool.py records through the class).
    real_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *args, **kwargs):
        (m, k), (k2, n) = a.data.shape, b.data.shape
        assert k == k2
        counts[current[0]] += 2 * m * n * k
        return real_dot(self, a, b, *args, **kwargs)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    return counts, current


@pytest.fixture
def dot_counter(monkeypatch):
    counts, current = install_dot_counter(monkeypatch)
    real_launch = attention_triton._launch

    def tagged_launch(kernel, launch, *args, **kwargs):
        current[0] = launch.name
        counts[launch.name] += 0
        real_launch(kernel, launch, *args, **kwargs)
        current[0] = "?"
    monkeypatch.setattr(attention_triton, "_launch", tagged_launch)
    return counts


CASES = {
    # id: (Nq, Nv, kind, params, D, Dv)
    # short partial windows, long global rows: split=1 splits the global tiles over their keys
    "pg1d": (261, 256, 0, (256, 0, 0, 0, 0), 24, 40),
    "pg1d-np0": (9, 100, 0, (0, 0, 0, 0, 0), 16, 16),
    "pg2d": (259, 256, 1, (256, 16, 16, 16, 16), 32, 32),
    "band": (70, 70, 2, (9, 4, 0, 0, 0), 32, 16),
    # ParGo self: global rows see keys [41, 230) only (splits start mid-tile); partial band
    "pgself": (230, 230, 3, (41, 2, 1, 0, 0), 24, 40),
    "pgself-none": (300, 300, 3, (40, 39, 39, 0, 0), 16, 16),
}


@COUNTS_DOTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("split", [None, 1], ids=["nosplit", "split"])
@pytest.mark.parametrize("case", list(CASES))
def test_issued_flops_equal_executed_dots(case, split, dtype, dot_counter, monkeypatch):
    nq, nv, kind, params, D, Dv = CASES[case]
    if split is not None:  # lower the split threshold so global tiles split over their keys
        for fn in ("forward_plan", "backward_plan"):
            real = getattr(plan, fn)
            monkeypatch.setattr(plan, fn, lambda p, _r=real, **kw: _r(p, split_min_iters=split))
    B, H = 2, 1
    q = torch.randn(B, H, nq, D).to(dtype)
    k = torch.randn(B, H, nv, D).to(dtype)
    v = torch.randn(B, H, nv, Dv).to(dtype)
    out, lse = attention_triton.attention_forward(q, k, v, kind, params, D ** -0.5)
    do = torch.randn_like(out)
    attention_triton.attention_backward(do, q, k, v, out, lse, kind, params, D ** -0.5)
    p = plan.Problem(B, H, nq, nv, D, Dv, dtype, kind, params)
    expected = {}
    for which in ("fwd", "bwd"):
        expected.update(work_model.issued_flops(p, which, **(
            {} if split is None else dict(split_min_iters=split))))
    kernels = {k: v for k, v in expected.items() if k in work_model.KERNELS}  # not reductions
    assert dict(dot_counter) == kernels
    assert dot_counter["?"] == 0 and sum(expected.values()) > 0
    if split is not None and kind != 2 and params[0] > 0:  # the split launches did run
        assert "fwd_merge" in expected and "dq_reduce" in expected
        assert ("dq_delta" in kernels) == (dtype != torch.float32)


def test_model_cli_rows(tmp_path):
    """The CLI writes the issue's row schema (attention rows; the R figures need the real
    compiler, so it runs without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "work_model.py"),
                           "--ops", "attention", "--cases", "paper", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())
    keys = {"op", "case", "pass", "flops_issued", "flops_ideal", "flops_dense", "flops_flex128",
            "bytes_floor", "bytes_requested", "programs", "max_iters_per_program",
            "mean_iters_per_program"}
    assert [(r["op"], r["case"], r["pass"]) for r in rows] == \
        [("partial_global", "paper", "fwd"), ("partial_global", "paper", "bwd")]
    for r in rows:
        assert keys <= set(r)
        # paper shape, bf16, B*H = 2048: Q, K, V, O and LSE each moved once at least
        assert r["bytes_requested"] >= r["bytes_floor"] > 0
        assert r["flops_ideal"] < r["flops_issued"] < r["flops_dense"]
    assert rows[0]["flops_ideal"] == 2048 * (288 * 2 + 16 * 576) * 2 * 128
    assert "| partial_global | paper | fwd |" in proc.stdout


class _Tagged:
    """A varlen kernel whose launches set the counter's tag to ``name``."""

    def __init__(self, kernel, name, counts, current):
        self.kernel, self.name, self.counts, self.current = kernel, name, counts, current

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            name = "dq_delta" if kwargs.get("DELTA_ONLY") else self.name
            self.current[0] = name
            self.counts[name] += 0
            launch(*args, **kwargs)
            self.current[0] = "?"
        return run


@COUNTS_DOTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op,split_keys", [("pg2d", None), ("pg1d", None), ("band", None),
                                           ("band_per_seq", None), ("pg2d", 64), ("pg1d", 64)])
def test_varlen_issued_flops_equal_executed_dots(op, split_keys, dtype, monkeypatch):
    """work_model_varlen.py's FLOPs per launch of a packed batch (sequences of mixed lengths and
    grids, Np = 0 and Ng = 0 included, keys spanning several tiles; band: a shared window or
    one per sequence from the plan) equal the dots the varlen kernels run under the
    interpreter; with ``split_keys`` the global tiles of the long sequences are split over keys
    (the 16-bit delta-only launch counted as ``dq_delta``)."""
    from pargo_kernels.ops import varlen_triton
    from pargo_kernels.varlen_plan import plan_band, plan_partial_global
    import work_model_varlen
    counts, current = install_dot_counter(monkeypatch)
    for name, attr in (("fwd", "_varlen_fwd_kernel"), ("dq", "_varlen_bwd_dq_kernel"),
                       ("dkdv", "_varlen_bwd_dkdv_kernel")):
        monkeypatch.setattr(varlen_triton, attr,
                            _Tagged(getattr(varlen_triton, attr), name, counts, current))
    D, Dv, H, window = 16, 24, 2, (5, 3)
    if op == "pg2d":  # (visual grid, partial grid, globals)
        seqs = [((20, 20), (15, 13), 3), ((1, 1), (1, 1), 0), ((7, 13), (7, 3), 1)]
        nv = [a * b for (a, b), _, _ in seqs]
        npart = [a * b for _, (a, b), _ in seqs]
        nq = [n + g for n, (_, _, g) in zip(npart, seqs)]
        kw = dict(visual_grids=[s[0] for s in seqs], partial_grids=[s[1] for s in seqs])
    else:
        nv, npart, nq, kw = [97, 5, 70], [13, 0, 70], [16, 4, 70], {}
    cu_q = [0, *torch.tensor(nq).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(nv).cumsum(0).tolist()] if op[:4] != "band" else cu_q
    vplan = (plan_band(cu_q) if op == "band" else
             plan_band(cu_q, windows=[(5, 3), (0, 9), (40, 1)]) if op == "band_per_seq" else
             plan_partial_global(cu_q, cu_k, npart, split_keys=split_keys, **kw))
    win = window if op == "band" else (0, 0)
    q = torch.randn(cu_q[-1], H, D).to(dtype)
    k = torch.randn(cu_k[-1], H, D).to(dtype)
    v = torch.randn(cu_k[-1], H, Dv).to(dtype)
    out, lse = varlen_triton.varlen_forward(q, k, v, vplan, vplan.kind, win, D ** -0.5)
    varlen_triton.varlen_backward(torch.randn_like(out), q, k, v, out, lse, vplan, vplan.kind,
                                  win, D ** -0.5)
    expected = {}
    for which in ("fwd", "bwd"):
        expected.update(work_model_varlen.issued_flops(vplan, which, H, D, Dv, dtype, win))
    assert dict(counts) == expected
    assert counts["?"] == 0 and all(x > 0 for x in expected.values())
    assert ("dq_delta" in expected) == (split_keys is not None and dtype != torch.float32)


def test_varlen_rows_tiny(monkeypatch):
    """The varlen rows on bench_varlen.py's --smoke batch (residency stubbed: it needs the
    real compiler): the row schema, the ideal FLOPs from the per-image masks, the floors from
    the packed lengths, programs = the plan's tiles x H, and the padded alternative issuing
    every pair of the padded tensors (at this tiny size fewer than the issued tiles)."""
    import work_model_varlen
    monkeypatch.setattr(work_model, "resources", lambda *a, **kw: (64, 16384, 4))
    from pargo_kernels.varlen_plan import A_KTILES, A_QTILES
    from pargo_kernels.ops.varlen_triton import varlen_tile_config
    H, D = 2, 64
    for (op, case), (vplan, masks, window) in work_model_varlen.dynres_cases(smoke=True).items():
        allowed = sum(int(m.materialize().sum()) for m in masks)
        nq = [m.materialize().shape[0] for m in masks]
        nv = [m.materialize().shape[1] for m in masks]
        tq, tk = sum(nq), sum(nv)
        for which, per_pair in (("fwd", 4 * D), ("bwd", 10 * D)):
            row = work_model_varlen.varlen_row(op, case, vplan, masks, which, H, D,
                                               torch.bfloat16, window)
            assert row["flops_ideal"] == H * allowed * per_pair
            assert row["flops_ideal"] <= row["flops_issued"]  # tiles padded to 16..64 rows
            assert row["flops_padded"] == H * len(masks) * max(nq) * max(nv) * per_pair
            io = 2 * D * (tq + 2 * tk)
            floor = H * (io + 2 * tq * D + 4 * tq) if which == "fwd" else \
                H * (2 * io + 4 * tq * D + 4 * tq)
            assert row["bytes_floor"] == floor and row["bytes_requested"] >= floor
            names = ["fwd"] if which == "fwd" else ["dq", "dkdv"]
            tiles = [vplan.tiles(A_KTILES if n == "dkdv" else A_QTILES,
                                 varlen_tile_config(n, D, torch.bfloat16)[
                                     "BLOCK_N" if n == "dkdv" else "BLOCK_M"]) for n in names]
            assert row["programs"] == H * sum(tiles)
            assert [s["name"] for s in row["launches"]] == names
            pad = work_model_varlen.padded_row(row)
            assert pad["op"].endswith("_padded_dense") and pad["flops_issued"] == \
                row["flops_padded"] and pad["bytes_requested"] > pad["bytes_floor"] > floor
