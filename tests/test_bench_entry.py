"""The pytest-benchmark entry (benchmarks/test_bench_ops.py) collects the cases of run_all.py
and, without a GPU, skips every test with the reason printed. Runs it in a subprocess with no
visible CUDA device (so also on a GPU machine it only checks collection and the skip)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "PARGO_BENCH_SMOKE")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-p",
                           "no:cacheprovider", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_benchmark_entry_collects_and_skips_without_gpu():
    rc, out = _pytest("--benchmark-only", "-rs", "-v")
    assert rc == 0, out[-3000:]
    for name in ("paper-B256-ours[triton]-fwd", "paper-B256-flex-fwd+bwd",
                 "paper-B256-sdpa[flash]-fwd", "paper-B256-sdpa[math]-fwd+bwd",
                 "pool-24to12-C1024-N4096-B256-ours[triton]-fwd+bwd",
                 "pool-24to12-C1024-N4096-B256-ours-fused[triton]-fwd",
                 "pool-24to12-C1024-N4096-B256-deco-eager-fwd"):
        assert f"test_op[{name}] SKIPPED" in out, out[-3000:]
    n = int(re.search(r"collected (\d+) items", out).group(1))
    assert re.search(rf"SKIPPED \[{n}\] .*no CUDA device", out), out[-3000:]
    assert f"{n} skipped" in out and "passed" not in out, out[-3000:]
