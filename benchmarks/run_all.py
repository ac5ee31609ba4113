"""Run every benchmark script, merge their rows into one JSON, write the markdown and plots.

    python benchmarks/run_all.py                 # full run on a GPU (~5 min), results in
                                                 #   benchmarks/results/<date>-<device>.json/.md/.png
    python benchmarks/run_all.py --quick         # fewer shapes, shorter timing
    python benchmarks/run_all.py --smoke         # CPU, tiny shapes, into a temp dir: checks only
    python benchmarks/run_all.py --out DIR --budget-s 280

Each script runs in its own process under a wall-clock budget (a share of ``--budget-s``; past
it the remaining cases are recorded SKIPPED) and a hard timeout a little longer, so a hang or a
crash in one loses only that script's unfinished rows (rows are written as they are measured).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402

# script name -> (file, share of the time budget)
SCRIPTS = {"partial_global": ("bench_partial_global.py", 0.35),
           "band": ("bench_band.py", 0.15),
           "pargo_self": ("bench_pargo_self.py", 0.10),
           "pooling": ("bench_pooling.py", 0.15),
           "varlen": ("bench_varlen.py", 0.25)}
GRACE_S = 60  # hard timeout = budget + grace (one case may overrun the budget check)


def _run(cmd, log_path, timeout_s, env):
    """Run ``cmd``, echoing and logging its output; kill it (its own pid) after ``timeout_s``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        killed = {"v": False}

        def kill():
            killed["v"] = True
            proc.kill()
        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
    return (124 if killed["v"] else rc), round(time.perf_counter() - t0, 1)


def merge(raw_dir: str, scripts_info: dict) -> dict:
    rows, meta = [], None
    for name in SCRIPTS:
        mpath = os.path.join(raw_dir, f"{name}.meta.json")
        if os.path.exists(mpath):
            with open(mpath) as f:
                m = json.load(f)
            meta = meta or m["facts"]
            scripts_info.setdefault(name, {}).update(skipped=m.get("skipped"),
                                                    unavailable=m.get("unavailable"))
            if m.get("ratios"):  # bench_varlen.py: the ratios, reported not asserted
                scripts_info[name]["ratios"] = m["ratios"]
        rpath = os.path.join(raw_dir, f"{name}.jsonl")
        if os.path.exists(rpath):
            with open(rpath) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return {"meta": meta or {}, "scripts": scripts_info, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None,
                   help="result folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget for the benchmarks (default 290, quick 150)")
    p.add_argument("--only", default=None, help="comma list of " + ",".join(SCRIPTS))
    p.add_argument("--inject-wrong", action="store_true",
                   help="add a deliberately wrong provider to every script")
    p.add_argument("--modes", default=None)
    a, passthrough = p.parse_known_args(argv)

    out = a.out or (tempfile.mkdtemp(prefix="pargo-bench-smoke-") if a.smoke
                    else os.path.join(HERE, "results"))
    os.makedirs(out, exist_ok=True)
    # scripts write their rows to <parent>/raw/<name>.jsonl; keep them beside the results only
    # when the caller named the folder (the GPU run), not inside the repository's results/
    parent = out if (a.out or a.smoke) else tempfile.mkdtemp(prefix="pargo-bench-raw-")
    raw = os.path.join(parent, "raw")
    os.makedirs(raw, exist_ok=True)
    for old in glob.glob(os.path.join(raw, "*.json*")):
        os.remove(old)
    budget = a.budget_s
    if budget is None and not a.smoke:
        budget = 150.0 if a.quick else 290.0
    names = a.only.split(",") if a.only else list(SCRIPTS)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if a.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.perf_counter()
    info = {}
    for i, name in enumerate(names):
        script, share = SCRIPTS[name]
        cmd = [sys.executable, os.path.join(HERE, script), "--out", parent]
        cmd += ["--smoke"] * a.smoke + ["--quick"] * a.quick + ["--inject-wrong"] * a.inject_wrong
        if a.modes:
            cmd += ["--modes", a.modes]
        if name == "pooling" and a.smoke:
            cmd.append("--allow-missing-ours")
        timeout = None
        if budget is not None:
            left = budget - (time.perf_counter() - t0)
            shares = sum(SCRIPTS[n][1] for n in names[i:])
            mine = max(10.0, left * share / shares)
            cmd += ["--budget-s", f"{mine:.0f}"]
            timeout = mine + GRACE_S
        cmd += passthrough
        print(f"[run_all] {' '.join(cmd)}", flush=True)
        rc, secs = _run(cmd, os.path.join(out, f"{name}.log"), timeout, env)
        info[name] = {"rc": rc, "seconds": secs}
        if rc != 0:
            print(f"[run_all] {name} exited with rc={rc}" + (" (timeout)" if rc == 124 else ""),
                  flush=True)
    data = merge(raw, info)
    m = data["meta"]
    date = (m.get("date_utc") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    dslug = m.get("device_slug", "unknown") + ("-smoke" if a.smoke else "")
    path = os.path.join(out, f"{date}-{dslug}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    print(f"[run_all] wrote {path} ({len(data['rows'])} rows, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    report.make_report(path)
    print(report.summary(data), flush=True)
    return 0 if all(v["rc"] == 0 for v in info.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
