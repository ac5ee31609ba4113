"""benchmarks/gpu_plan.py's launch recorder and the GPU test profile it counts.

The recorder stands in for every Triton launch and keeps the key the GPU's JIT would compile it
under (sm_90); these tests check that it tells specializations apart (dtypes, mask kinds, head
dims) and not shapes, and that the profile's CPU shapes need exactly the compiles of its GPU
shapes, so the CPU run in CI exercises what the GPU run compiles. They run in a subprocess
with ``TRITON_INTERPRET=1`` (the recorder replaces the interpreter's launches).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = r"""
import json, sys
sys.path[:0] = [ROOT, ROOT + "/benchmarks", ROOT + "/tests"]
import torch
import gpu_plan
import test_gpu_profile as prof
import pargo_kernels as pk
out = {}
with gpu_plan.LaunchRecorder() as rec:
    for case, d in prof.all_cases("triton"):
        for small in (True, False):
            rec.label = f"{case}|{d}|{small}"
            prof.check(case, d, "triton", device="cpu", small=small)
    for D in (64, 80):  # a head dim is a constexpr (BLOCK_D); a length is not
        for n in (40, 200):
            rec.label = f"band-D{D}-n{n}"
            q = torch.empty(1, 2, n, D, dtype=torch.bfloat16)
            pk.band_attention(q, q, q, (3, 1), backend="triton")
out = {label: sorted(k[0] + " " + k[1] for k in keys) for label, keys in rec.keys.items()}
print(json.dumps(out))
"""


def test_recorder_and_profile_sizes():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + CODE], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = {k: set(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    # a head dim is a new specialization, a sequence length is not
    assert keys["band-D64-n40"] == keys["band-D64-n200"]
    assert len(keys["band-D64-n40"]) == 1 and keys["band-D64-n40"] != keys["band-D80-n40"]
    by_dtype = {}
    for label, ks in keys.items():
        if label.startswith("band-D"):
            continue
        case, dtype, small = label.split("|")
        assert ks, label  # every case launches Triton kernels
        if small == "True":  # the CPU shapes compile exactly what the GPU shapes do
            assert ks == keys[f"{case}|{dtype}|False"], (case, dtype)
        by_dtype.setdefault(dtype, set()).update(ks)
    # dtypes share no specialization (the test step runs one process per dtype)
    assert not (by_dtype["fp32"] & by_dtype["fp16"] or by_dtype["fp32"] & by_dtype["bf16"]
                or by_dtype["fp16"] & by_dtype["bf16"])
    # every mask kind of the fixed-shape kernels, forward and both backward kernels, per dtype
    fwd = {k for k in by_dtype["bf16"] if ".attention_triton._attn_fwd_kernel " in k}
    assert len(fwd) == 4, fwd  # pg1d, pg2d, band, pargo_self
    for name in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_varlen_fwd_kernel",
                 "_varlen_bwd_dq_kernel", "_varlen_bwd_dkdv_kernel", "_pool_fwd_kernel",
                 "_pool_bwd_kernel", "_pool_proj_fwd_kernel", "_pool_varlen_fwd_kernel",
                 "_pool_proj_varlen_fwd_kernel"):
        assert any(f".{name} " in k for k in by_dtype["fp16"]), name
