"""The benchmark harness in --smoke mode: tiny shapes on CPU, every script, one process each.

Checks that the correctness gate of the benchmarks can fail (a deliberately wrong provider must
come out WRONG and untimed), that correct providers pass it, and that the merged JSON and the
markdown are written with the expected fields. No timing is judged.
"""
import json
import os
import subprocess
import sys
import glob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"op", "case", "provider", "mode", "status", "ms", "ms_p20", "ms_p80", "err", "tol",
        "ref_dtype", "peak_mb", "bytes", "flops", "gbps", "tflops", "x_floor", "note", "config"}


def test_benchmarks_smoke(tmp_path):
    env = dict(os.environ)
    # the Triton interpreter makes this 3x slower; the kernels' own tests cover it
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"),
                           "--smoke", "--inject-wrong", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "*-smoke.json"))
    data = json.load(open(path))
    assert data["meta"]["smoke"] is True and data["meta"]["torch"]
    rows = data["rows"]
    assert rows and all(KEYS <= set(r) for r in rows)
    ops = {r["op"] for r in rows}
    assert {"partial_global", "band", "partial_global_varlen", "band_varlen",
            "pool_varlen"} <= ops
    if "pooling" not in ops:  # pooling ops not importable yet: the skip must say why
        assert data["scripts"]["pooling"]["skipped"] or data["scripts"]["pooling"]["unavailable"]

    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        wrong = [r for r in op_rows if r["provider"].startswith("wrong[")]
        assert wrong and all(r["status"].startswith("WRONG (") for r in wrong), wrong
        assert all(r["ms"] is None and r["err"] > r["tol"] for r in wrong)
        # the float64-checked baselines and the reference backend pass the gate and are timed
        baseline = {"pooling": "deco-eager", "pool_varlen": "per-image-loop"}.get(
            op, "sdpa-padded" if op.endswith("_varlen") else "pargo-eager")
        for prov in ("ours[reference]", baseline):
            ok = [r for r in op_rows if r["provider"] == prov]
            assert ok and all(r["status"] == "ok" and r["ms"] is not None and r["err"] <= r["tol"]
                              for r in ok), (prov, ok)
        assert {r["mode"] for r in op_rows} == {"fwd", "bwd", "fwd+bwd"}
    # providers that cannot run say why instead of failing
    assert all(r["status"].startswith(("ok", "WRONG (", "n/a (")) for r in rows), \
        [r for r in rows if not r["status"].startswith(("ok", "WRONG (", "n/a ("))]

    md = open(path[:-5] + ".md").read()
    assert "SMOKE RUN" in md and "| case |" in md and "WRONG (" in md
    # no Triton without the interpreter here, so no ratio has both sides: the section is there
    assert "time" in data["scripts"]["varlen"]["ratios"] and "## ratios of `varlen`" in md


def test_varlen_benchmark_smoke(tmp_path):
    """bench_varlen.py --smoke under the Triton interpreter: a tiny dynamic-resolution batch;
    our Triton varlen ops (with and without the plan build), the padded dense SDPA and the
    per-image pooling loop pass the per-image float64 gate and are timed; Flex runs forward
    (eager) or says why not; a rolled-keys provider comes out WRONG; the ratios are written."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_varlen.py"),
                           "--smoke", "--inject-wrong", "--modes", "fwd,fwd+bwd", "--out",
                           str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "raw" / "varlen.jsonl")]
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    cases = {r["case"] for r in rows}
    assert cases == {"pg", "pg-half", "band", "band-half", "pool", "pool-half"}
    attn = ("ours[triton]", "ours[triton]+plan", "sdpa-padded", "sdpa-padded+mask")
    pool = ("ours[triton]", "ours[triton]+plan", "per-image-loop")
    for case in cases:
        for prov in (pool if case.startswith("pool") else attn):
            for mode in ("fwd", "fwd+bwd"):
                r = by[(case, prov, mode)]
                assert r["status"] == "ok" and r["err"] <= r["tol"] and r["ms"] > 0, r
        wrong = [r for r in rows if r["case"] == case and r["provider"].startswith("wrong[")]
        assert len(wrong) == 2 and all(r["status"].startswith("WRONG (") for r in wrong), wrong
        if not case.startswith("pool"):
            fl = by[(case, "flex+mask", "fwd")]
            assert fl["status"] == "ok" or fl["status"].startswith("n/a ("), fl
            assert by[(case, "flex", "fwd+bwd")]["status"].startswith("n/a ("), "no CPU bwd"
    meta = json.load(open(tmp_path / "raw" / "varlen.meta.json"))
    labels = {(r["case"], r["ratio"]) for r in meta["ratios"]["time"]}
    assert ("pg", "sdpa-padded+mask / ours+plan (incl. construction)") in labels
    assert "flex+mask / ours+plan (incl. construction)" in proc.stdout or \
        "n/a (" in by[("pg", "flex+mask", "fwd")]["status"]


def test_projector_benchmark_smoke(tmp_path):
    """bench_projectors.py --smoke: the kernels path of ParGo / Q-Former / DeCo runs (Triton
    interpreter), agrees with the reference path, and the JSON + markdown are written."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_projectors.py"),
                           "--smoke", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.load(open(tmp_path / "projectors-smoke.json"))
    rows = data["rows"]
    assert {r["case"] for r in rows} == {"pargo", "qformer", "deco"}
    assert {r["provider"] for r in rows} == {"kernels", "reference"}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0, r
        assert 0 < r["err"] <= r["tol"], r  # bf16 kernels vs reference: close, not identical
    assert "| pargo | 16 | kernels | ok |" in (tmp_path / "projectors-smoke.md").read_text()
