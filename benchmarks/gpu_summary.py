"""The summary of one ``benchmarks/gpu_run.sh`` run: ``summary.md`` from its work folder.

    python benchmarks/gpu_summary.py WORKDIR        # writes WORKDIR/summary.md, prints it

Reads what the run left in WORKDIR (whatever got that far): ``steps.tsv`` (one line per step:
name, rc, seconds, note), ``env.txt``, ``build.log``, ``tests/<process>.log``, the benchmark
rows under ``bench/raw`` (merged here by ``run_all``'s own merge, so this never has to pick a
JSON file) and the projector step's ``proj/projectors-*.md``. A failed CUDA-extension build is
the first thing the summary says.
"""
from __future__ import annotations

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# pytest's last line: "= 3 passed, 1 skipped in 2.01s =" (-q: without the "=")
PYTEST_TAIL = re.compile(r"^(?:=+ )?(\d+ (?:passed|failed|skipped|deselected|error|errors|"
                         r"xfailed|xpassed|warnings?)\b.*?|no tests ran) in ([\d.]+)s"
                         r"(?: \([\d:]+\))?(?: =+)?$")


def _read(path: str, default: str = "") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def steps(work: str) -> list[dict]:
    out = []
    for line in _read(os.path.join(work, "steps.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.append(dict(name=parts[0], rc=parts[1], seconds=parts[2],
                            note=parts[3] if len(parts) > 3 else ""))
    return out


def pytest_result(log: str) -> tuple[str, list[str]]:
    """(pytest's final counts line, or why there is none; FAILED / ERROR lines)."""
    final = None
    for line in log.splitlines():
        m = PYTEST_TAIL.match(line.strip())
        if m:
            final = f"{m.group(1)} in {m.group(2)} s"
    if "KeyboardInterrupt" in log:
        final = (final or "no counts") + " (interrupted: SIGINT, at its time limit or on a signal)"
    bad = [line.strip() for line in log.splitlines()
           if line.startswith(("FAILED ", "ERROR "))]
    return final or "no pytest summary (killed, or did not start)", bad


def bench_summary(work: str) -> tuple[str, str]:
    """(markdown path or '', run_all's summary text) from the raw rows, merged now."""
    raw = os.path.join(work, "bench", "raw")
    if not os.path.isdir(raw) or not glob.glob(os.path.join(raw, "*.jsonl")):
        return "", "no benchmark rows were written"
    import json

    import report
    import run_all
    info_path = os.path.join(raw, "run_all.info.json")
    info = json.loads(_read(info_path, "{}") or "{}")
    smoke = any(json.loads(_read(p, "{}") or "{}").get("facts", {}).get("smoke")
                for p in glob.glob(os.path.join(raw, "*.meta.json")))
    path = run_all.write_merged(os.path.join(work, "bench"), raw, info, smoke, plots=False)
    data = report.load(path)
    counts = {}
    for r in data["rows"]:
        key = r["status"].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    head = (f"{len(data['rows'])} rows ("
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")
    return path[:-5] + ".md", head + "\n\n" + report.summary(data)


def make(work: str) -> str:
    env = _read(os.path.join(work, "env.txt"))
    dry = os.path.exists(os.path.join(work, "DRY_RUN"))
    device = re.search(r"^gpu (.+)$", env, re.M)
    sha = re.search(r"^git (.+)$", env, re.M)
    name = device.group(1) if device else "device unknown"
    lines = [f"# GPU run summary: {'no GPU' + name[4:] if name.startswith('none') else name}, "
             f"git {sha.group(1) if sha else 'unknown'}", ""]
    if dry:
        lines += ["**DRY RUN on a CPU: smoke paths only; no number here is a GPU measurement.**",
                  ""]
    st = {s["name"]: s for s in steps(work)}
    build = st.get("build")
    if build is None:
        lines += ["**CUDA extension: not built (the run stopped before the build step).**", ""]
    elif build["rc"] != "0":
        why = [line for line in _read(os.path.join(work, "build.log")).splitlines()
               if "pargo_kernels:" in line or "error" in line.lower()][-3:]
        lines += [f"**CUDA EXTENSION BUILD FAILED (rc={build['rc']}, {build['seconds']} s): its "
                  "tests did not run; see build.log.**", ""]
        lines += [f"    {w.strip()[:300]}" for w in why] + [""]
    else:
        lines += [f"CUDA extension built ({build['seconds']} s).", ""]
    lines += ["| step | rc | seconds | result |", "|---|---|---|---|"]
    failures = []
    for s in st.values():
        result = s["note"]
        if s["name"] == "facts":  # the two ceilings measured there
            result = "; ".join(re.findall(r"^((?:copy|matmul) [\d.]+ \S+)", env, re.M)) or result
        if s["name"].startswith("tests:"):
            log = _read(os.path.join(work, "tests", s["name"][6:] + ".log"))
            result, bad = pytest_result(log) if log else (s["note"] or "no log", [])
            failures += [f"{s['name'][6:]}: {b}" for b in bad]
        lines.append(f"| {s['name']} | {s['rc']} | {s['seconds']} | {result} |")
    lines.append("")
    if failures:
        lines += ["## Test failures", ""] + [f"- {f}" for f in failures[:80]]
        if len(failures) > 80:
            lines.append(f"- ... {len(failures) - 80} more (tests.log)")
        lines.append("")
    md, text = bench_summary(work)
    if md:
        import shutil
        shutil.copy(md, os.path.join(work, "bench.md"))
    lines += ["## Benchmarks (headline cases; every row in bench.md / results.tgz)", "", "```",
              text, "```", ""]
    for path in sorted(glob.glob(os.path.join(work, "proj", "projectors-*.md"))):
        lines += ["## Projector training step", "", _read(path).strip(), ""]
    if not glob.glob(os.path.join(work, "proj", "projectors-*.md")):
        lines += ["## Projector training step", "", "no result written", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    text = make(argv[0])
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
