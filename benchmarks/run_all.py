"""Run every benchmark script, merge their rows into one JSON, write the markdown and plots.

    python benchmarks/run_all.py                 # full run on a GPU (~5 min), results in
                                                 #   benchmarks/results/<date>-<device>.json/.md/.png
    python benchmarks/run_all.py --quick         # fewer shapes, shorter timing
    python benchmarks/run_all.py --smoke         # CPU, tiny shapes, into a temp dir: checks only
    python benchmarks/run_all.py --out DIR --budget-s 280
    python benchmarks/run_all.py --merge-only --out DIR   # rebuild JSON / markdown / summary

Two phases (``PHASES``): the headline cases first (the first case of every script: the paper
shape's partial-global attention against Flex and SDPA, the packed varlen batch, the DeCo
pooling, ParGo's self-attention, the first cascade band; forward and forward+backward), then
every other case (``--smoke``: one phase, every case, unless ``--phases`` is given). Each
script runs in its own process under a wall-clock budget (a share of
what is left of ``--budget-s``; past it the remaining cases are recorded SKIPPED, and a case
whose first call compiles (FlexAttention, torch.compile) starts only if its compile fits) and a
hard timeout a little longer, never past the total budget, so a hang or a crash in one loses
only that script's unfinished rows. Rows are written as they are measured
(``<out>/raw/<script>.<phase>.jsonl``), and the merged JSON, markdown and summary are rewritten
after every script, so the report on disk is always current. On SIGINT / SIGTERM (``timeout -s
INT``) the running script is stopped and what was measured is merged and reported before exit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402

# script name -> file
SCRIPTS = {"partial_global": "bench_partial_global.py", "band": "bench_band.py",
           "pargo_self": "bench_pargo_self.py", "pooling": "bench_pooling.py",
           "varlen": "bench_varlen.py"}
HEADLINE_MODES = "fwd,fwd+bwd"
# (phase, [(script, arguments, share of the budget)]), in run order: headline cases first
PHASES = [
    ("1-headline", [("partial_global", ["--first", "1", "--modes", HEADLINE_MODES], 0.22),
                    ("varlen", ["--first", "1", "--modes", HEADLINE_MODES], 0.18),
                    ("pooling", ["--first", "1", "--modes", HEADLINE_MODES], 0.07),
                    ("pargo_self", ["--first", "1", "--modes", HEADLINE_MODES], 0.07),
                    ("band", ["--first", "1", "--modes", HEADLINE_MODES], 0.05)]),
    ("2-rest", [("partial_global", ["--skip-first", "1"], 0.16),
                ("varlen", ["--skip-first", "1"], 0.12),
                ("pooling", ["--skip-first", "1"], 0.04),
                ("pargo_self", ["--skip-first", "1"], 0.05),
                ("band", ["--skip-first", "1"], 0.04)]),
]
GRACE_S = 45  # hard timeout = budget + grace (one case may overrun the budget check)
RESERVE_S = 10  # of the total budget, kept for the merge and the report


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived: stop the running script, merge, report."""


def _on_signal(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the merge short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def _run(cmd, log_path, timeout_s, env):
    """Run ``cmd``, echoing and logging its output; stop it after ``timeout_s`` (SIGINT, so
    that it ends cleanly; SIGKILL 5 s later) or when this process is interrupted. Returns
    ``(rc, seconds)``; rc 124: timed out."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        timed_out = threading.Event()

        def on_timeout():
            timed_out.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the script's rows so far are on disk already
        timers = []
        if timeout_s is not None:
            timers = [threading.Timer(timeout_s, on_timeout),
                      threading.Timer(timeout_s + 5, lambda: proc.poll() is None and proc.kill())]
        for t in timers:
            t.daemon = True
            t.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            rc = proc.wait()
        finally:
            for t in timers:
                t.cancel()
            if proc.poll() is None:  # this process was interrupted: stop the script
                _stop(proc)
    return (124 if timed_out.is_set() else rc), round(time.perf_counter() - t0, 1)


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _load(path):
    with open(path) as f:
        return json.load(f)


def merge(raw_dir: str, scripts_info: dict) -> dict:
    """Every row and meta under ``raw_dir`` (all phases), in script then phase order."""
    rows, meta = [], None
    for name in SCRIPTS:
        metas = sorted(glob.glob(os.path.join(raw_dir, f"{name}.meta.json")) +
                       glob.glob(os.path.join(raw_dir, f"{name}.*.meta.json")))
        if not metas and name not in scripts_info:
            continue  # not run
        info = scripts_info.setdefault(name, {})
        for mpath in metas:
            try:
                m = _load(mpath)
            except (OSError, ValueError):  # being written right now
                continue
            meta = meta or m.get("facts")
            for key in ("skipped", "unavailable"):
                if m.get(key):
                    info[key] = m[key]
            info.setdefault("skipped", None)
            info.setdefault("unavailable", None)
            if m.get("ratios"):  # bench_varlen.py: the ratios, reported not asserted
                info["ratios"] = m["ratios"]  # the last phase's cover every phase's rows
        paths = sorted(glob.glob(os.path.join(raw_dir, f"{name}.jsonl")) +
                       glob.glob(os.path.join(raw_dir, f"{name}.*.jsonl")))
        for rpath in paths:
            with open(rpath) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a line cut off by a kill
                        pass
    return {"meta": meta or {}, "scripts": scripts_info, "rows": rows}


def write_merged(out: str, raw: str, info: dict, smoke: bool, plots: bool = True) -> str:
    """Merge the raw rows, write ``<date>-<device>.json`` and its markdown (and plots)."""
    data = merge(raw, info)
    m = data["meta"]
    date = (m.get("date_utc") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    dslug = m.get("device_slug", "unknown") + ("-smoke" if smoke or m.get("smoke") else "")
    path = os.path.join(out, f"{date}-{dslug}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    if plots:
        report.make_report(path)
    else:
        report.write_markdown(path)
    return path


def _info_path(raw: str) -> str:
    return os.path.join(raw, "run_all.info.json")


def _save_info(raw: str, info: dict) -> None:
    with open(_info_path(raw), "w") as f:
        json.dump(info, f, indent=1)


def _record(info: dict, name: str, phase: str, rc: int, secs: float) -> None:
    s = info.setdefault(name, {})
    s.setdefault("phases", {})[phase] = {"rc": rc, "seconds": secs}
    s["seconds"] = round(sum(p["seconds"] for p in s["phases"].values()), 1)
    s["rc"] = next((p["rc"] for p in s["phases"].values() if p["rc"] != 0), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None,
                   help="result folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget for the benchmarks, merge and report included "
                        "(default 290, quick 150)")
    p.add_argument("--only", default=None, help="comma list of " + ",".join(SCRIPTS))
    p.add_argument("--phases", default=None,
                   help="comma list of " + ",".join(ph for ph, _ in PHASES) + " (default: all)")
    p.add_argument("--inject-wrong", action="store_true",
                   help="add a deliberately wrong provider to every script")
    p.add_argument("--modes", default=None)
    p.add_argument("--merge-only", action="store_true",
                   help="merge <out>/raw into the JSON and markdown, print the summary, exit")
    a, passthrough = p.parse_known_args(argv)

    out = a.out or (tempfile.mkdtemp(prefix="pargo-bench-smoke-") if a.smoke
                    else os.path.join(HERE, "results"))
    os.makedirs(out, exist_ok=True)
    # scripts write their rows to <parent>/raw/<name>.<phase>.jsonl; keep them beside the
    # results only when the caller named the folder (the GPU run), not in the repository's
    # results/
    parent = out if (a.out or a.smoke) else tempfile.mkdtemp(prefix="pargo-bench-raw-")
    raw = os.path.join(parent, "raw")
    if a.merge_only:
        info = _load(_info_path(raw)) if os.path.exists(_info_path(raw)) else {}
        path = write_merged(out, raw, info, a.smoke)
        print(f"[run_all] wrote {path}", flush=True)
        print(report.summary(report.load(path)), flush=True)
        return 0
    os.makedirs(raw, exist_ok=True)
    for old in glob.glob(os.path.join(raw, "*.json*")):
        os.remove(old)
    budget = a.budget_s
    if budget is None and not a.smoke:
        budget = 150.0 if a.quick else 290.0
    names = a.only.split(",") if a.only else list(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        p.error(f"--only: unknown scripts {unknown} (known: {list(SCRIPTS)})")
    if a.smoke and not a.phases:  # CPU smoke: one process per script (CI time), all cases
        runs = [("0-smoke", name, [], 1.0) for name in SCRIPTS if name in names]
    else:
        phases = a.phases.split(",") if a.phases else [ph for ph, _ in PHASES]
        unknown = [ph for ph in phases if ph not in dict(PHASES)]
        if unknown:
            p.error(f"--phases: unknown {unknown} (known: {[ph for ph, _ in PHASES]})")
        runs = [(ph, name, args, share) for ph, items in PHASES if ph in phases
                for name, args, share in items if name in names]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if a.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.perf_counter()
    info: dict = {}
    interrupted = None
    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, (phase, name, sargs, share) in enumerate(runs):
            cmd = [sys.executable, os.path.join(HERE, SCRIPTS[name]), "--out", parent,
                   "--tag", phase]
            cmd += ["--smoke"] * a.smoke + ["--quick"] * a.quick
            cmd += ["--inject-wrong"] * a.inject_wrong
            if name == "pooling" and a.smoke:
                cmd.append("--allow-missing-ours")
            cmd += sargs
            if a.modes:
                cmd += ["--modes", a.modes]
            timeout = None
            if budget is not None:
                left = budget - RESERVE_S - (time.perf_counter() - t0)
                if left < 5:
                    print(f"[run_all] {name} ({phase}): no budget left, not started", flush=True)
                    _record(info, name, phase, 124, 0.0)
                    continue
                shares = sum(r[3] for r in runs[i:])
                mine = max(5.0, left * share / shares)
                cmd += ["--budget-s", f"{mine:.0f}"]
                timeout = min(mine + GRACE_S, left)
            cmd += passthrough
            print(f"[run_all] {' '.join(cmd)}", flush=True)
            rc, secs = _run(cmd, os.path.join(out, f"{name}.log"), timeout, env)
            _record(info, name, phase, rc, secs)
            _save_info(raw, info)
            if rc != 0:
                print(f"[run_all] {name} ({phase}) exited with rc={rc}"
                      + (" (timeout)" if rc == 124 else ""), flush=True)
            write_merged(out, raw, info, a.smoke, plots=False)  # always current on disk
    except Interrupted as exc:
        interrupted = str(exc)
        print(f"[run_all] {interrupted}: stopping, merging what was measured", flush=True)
    finally:
        if not interrupted:
            for s, h in old_handlers.items():
                signal.signal(s, h)
    _save_info(raw, info)
    path = write_merged(out, raw, info, a.smoke, plots=not interrupted)
    data = report.load(path)
    print(f"[run_all] wrote {path} ({len(data['rows'])} rows, "
          f"{time.perf_counter() - t0:.0f} s)" + (f", interrupted by {interrupted}"
                                                    if interrupted else ""), flush=True)
    print(report.summary(data), flush=True)
    if interrupted:
        return 130
    return 0 if all(v.get("rc") == 0 for v in info.values() if "phases" in v) else 1


if __name__ == "__main__":
    sys.exit(main())
