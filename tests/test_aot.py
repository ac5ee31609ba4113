"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no register spill, and
16-bit tl.dot kernels use tensor cores (mma.sync / wgmma). Runs `python -m pargo_kernels.aot`
in a subprocess without TRITON_INTERPRET (the real compiler, no GPU needed)."""
import json
import os
import subprocess
import sys


def test_aot_compiles_every_kernel_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "pargo_kernels.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
            "_attn_bwd_delta_kernel"} <= kernels
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, r
        if r["kernel"].startswith("_attn_") and "delta" not in r["kernel"] and \
                ("bf16" in r["config"] or "fp16" in r["config"]):
            assert r["tensor_cores"] != "-", r
