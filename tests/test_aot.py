"""Triton kernels compile ahead of time (no GPU) for every architecture people have, with no
register spill and within each architecture's shared memory; 16-bit tl.dot kernels use tensor
cores (mma.sync / wgmma), fp32 ones never do (exact fp32, no TF32). Runs
`python -m pargo_kernels.aot` in a subprocess without TRITON_INTERPRET (the real compiler).

CI budget (2 cores): the test compiles a representative subset of the attention kernels on all
five architectures (each mask kind, both dtype classes, the largest head dims, where spills and
shared memory run out first, and the paper's d=64), the fixed-shape pooling kernels on sm_80 and
sm_90 (their per-architecture specs are the pooling module's), a few varlen attention (sm_80,
sm_90, sm_86) and varlen pooling configurations (see the subsets); the full matrix is the CLI's:
`python -m pargo_kernels.aot --arch 75 86 89 80 90`.
"""
import json
import os
import subprocess
import sys

ARCHS = [75, 80, 86, 89, 90]
# "_kernel <label>": the fixed-shape kernels only (varlen labels read "varlen-pg1d ...")
SUBSET = ["_kernel pg1d bf16 d=64 ", "_kernel pg2d fp16 d=128", "_kernel band bf16 d=256",
          "_kernel pg1d fp32 d=128", "_kernel pg2d fp32 d=64 ", "_kernel band fp32 d=256",
          "_attn_bwd_delta_kernel fp32 d=256"]
# varlen attention on sm_80 / sm_90 (the archs its tile table is checked for): configs that
# spilled before their per-arch overrides, both dtype classes
VARLEN_SUBSET = ["varlen-pg2d fp16 d=32 ", "varlen-pg1d fp32 d=128", "varlen-band fp32 d=256",
                 "varlen-pg2d bf16 d=64 "]
# varlen attention on sm_86 (sm_89 has the same table and spilled in the same configs): one
# launch each of four that spilled 8-28 B with the sm_80 tiles, before sm_86/89 had their own
VARLEN_SM86_SUBSET = ["_varlen_fwd_kernel varlen-band bf16 d=64 ",
                      "_varlen_bwd_dkdv_kernel varlen-pg1d fp16 d=64 ",
                      "_varlen_bwd_dq_kernel varlen-band fp32 d=128 ",
                      "_varlen_fwd_kernel varlen-pg2d fp32 d=32 "]
# fixed-shape pooling: "_kernel pool <dtype>" / "_kernel pool-proj <dtype>" (not "pool-varlen")
POOL_SUBSET = ["_kernel pool ", "_kernel pool-proj "]
# varlen pooling on sm_90, where the 16-bit backward gather spilled with 4 warps before its
# per-arch warp count, and sm_75 (no fused kernel there): that backward, a forward, the fused
# projection in both dtype classes (tensor cores for bf16, none for fp32)
VARLEN_POOL_SUBSET = ["_pool_varlen_bwd_kernel pool-varlen bf16 ",
                      "_pool_varlen_bwd_kernel pool-varlen fp16 M=32 ",
                      "_pool_varlen_fwd_kernel pool-varlen fp32 M=16 ",
                      "pool-proj-varlen bf16 bias ", "pool-proj-varlen fp32 nobias "]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _aot(tmp_path, archs, filters):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "pargo_kernels.aot", "--arch", *map(str, archs),
                           "--filter", *filters, "--json", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_pool_kernels_compile(tmp_path):
    rows = _aot(tmp_path, [80, 90], POOL_SUBSET)
    assert rows and all(r["ok"] and r["spill_bytes"] == 0 for r in rows), rows
    assert not [r for r in rows if "varlen" in r["kernel"]]


def test_varlen_pool_kernels_compile(tmp_path):
    rows = _aot(tmp_path, [75, 90], VARLEN_POOL_SUBSET)
    fused = "_pool_proj_varlen_fwd_kernel"
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        *((k, a) for k in ("_pool_varlen_bwd_kernel", "_pool_varlen_fwd_kernel") for a in (75, 90)),
        (fused, 90)}
    assert len([r for r in rows if r["kernel"] == "_pool_varlen_bwd_kernel"]) == 2 * 4
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, r
        if r["kernel"] == fused:
            assert (r["tensor_cores"] == "-") == ("fp32" in r["config"]), r


def test_varlen_attention_kernels_compile(tmp_path):
    rows = _aot(tmp_path, [80, 90], VARLEN_SUBSET)
    assert {r["kernel"] for r in rows} == {"_varlen_fwd_kernel", "_varlen_bwd_dq_kernel",
                                           "_varlen_bwd_dkdv_kernel"}
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows), rows


def test_varlen_attention_kernels_compile_on_sm86(tmp_path):
    rows = _aot(tmp_path, [86], VARLEN_SM86_SUBSET)
    assert len(rows) == len(VARLEN_SM86_SUBSET), rows
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0 and r["shared_bytes"] <= 99 * 1024, r
        assert r["tensor_cores"] == ("-" if "fp32" in r["config"] else "mma.sync"), r


def test_aot_compiles_every_arch_without_spills(tmp_path):
    rows = _aot(tmp_path, ARCHS, SUBSET)
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
            "_attn_bwd_delta_kernel"} <= kernels
    assert {r["arch"] for r in rows} == set(ARCHS)
    limits = {75: 64, 80: 163, 86: 99, 89: 99, 90: 227}
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= limits[r["arch"]] * 1024, r
        if not r["kernel"].startswith("_attn_"):
            continue
        if "fp32" in r["config"]:
            assert r["tensor_cores"] == "-", r
        elif "delta" not in r["kernel"]:
            assert r["tensor_cores"] != "-" and r["arch"] >= 80, r
    # 16-bit attention is refused below sm_80, so no such configuration is compiled there
    assert not [r for r in rows if r["arch"] == 75 and r["kernel"].startswith("_attn_")
                and "fp32" not in r["config"]]


_TF32_MUTANT = """
import sys
import pargo_kernels.aot as aot
from pargo_kernels.ops import attention_triton as at
spec = next(s for s in at.aot_specs(90) if s[0] is at._attn_fwd_kernel and "pg1d fp32 d=64" in s[4])
kernel, ptrs, constexprs, options, label = spec
row = aot._compile_one(("pargo_kernels.ops.attention_triton", "_attn_fwd_kernel", ptrs,
                        dict(constexprs, PRECISION="tf32"), options, label, 90))
print(row.ok, row.tensor_cores, row.error)
sys.exit(0 if not row.ok and "TF32" in row.error else 1)
"""


def test_aot_rejects_tensor_cores_in_fp32_rows():
    """A TF32 mutant of an fp32 configuration must fail the check."""
    proc = subprocess.run([sys.executable, "-c", _TF32_MUTANT], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
