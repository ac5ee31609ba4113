"""Make the markdown table and PNG plots from a benchmark JSON written by ``run_all.py``.

    python benchmarks/report.py benchmarks/results/<date>-<device>.json [--summary]

Writes ``<same name>.md`` and ``<same name>-*.png`` beside the JSON (plots only if matplotlib
is importable; otherwise the reason is printed). ``--summary`` prints the short table only.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

MODES = ("fwd", "bwd", "fwd+bwd")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _cell(row: dict) -> str:
    st = row["status"]
    if st != "ok":
        if st.startswith("n/a"):
            return "n/a"
        if st.startswith("ERROR"):
            return "ERROR"
        if st.startswith("SKIPPED"):
            return "skipped"
        return st  # WRONG (err), OOM
    s = f"{row['ms']:.3f}"
    if row.get("x_floor") is not None:
        s += f" ({row['x_floor']:.1f}x)"
    return s


def _by(rows, *keys):
    out = OrderedDict()
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _never_ran(rows) -> dict:
    """providers whose every row is n/a for this op -> one reason."""
    out = OrderedDict()
    for (prov,), rs in _by(rows, "provider").items():
        if all(r["status"].startswith("n/a") for r in rs):
            st = rs[0]["status"]
            out[prov] = st[5:-1] if st.startswith("n/a (") else st
    return out


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# pargo_kernels benchmarks: {m.get('device_name')} ({m.get('date_utc')})", ""]
    if m.get("smoke"):
        lines += ["**SMOKE RUN on CPU: tiny shapes, host clock, the times below are NOT "
                  "measurements.** It only exercises the correctness gate and the output.", ""]
    lines += ["| fact | value |", "|---|---|"]
    for k in ("device_name", "capability", "sm_count", "total_mem_gb", "torch", "cuda", "cudnn",
              "triton", "python", "git_sha", "copy_gbps", "matmul_tflops", "dtype", "warmup_ms",
              "rep_ms", "quick", "smoke", "triton_interpret"):
        if k in m:
            lines.append(f"| {k} | {m[k]} |")
    lines += ["", "Cells: median ms (time / floor); floor = max(useful bytes / measured copy "
              "bandwidth, useful FLOPs / measured bf16 matmul rate). `WRONG (err)`: output or "
              "gradients off the float64/fp32 reference by more than REL_TOL, not timed. "
              "Full rows (quantiles, GB/s, TFLOP/s, memory, errors, notes) are in the JSON.", ""]
    runs = [(name, ph, p) for name, info in data.get("scripts", {}).items()
            for ph, p in (info.get("phases") or {}).items()]
    if runs:  # run_all.py's phases (rc 124: stopped at its time limit)
        lines += ["| script | phase | rc | seconds |", "|---|---|---|---|"]
        lines += [f"| {n} | {ph} | {p.get('rc')} | {p.get('seconds')} |" for n, ph, p in runs]
        lines.append("")
    for name, info in data.get("scripts", {}).items():
        if info.get("skipped") or info.get("rc") not in (0, None):
            lines.append(f"- script `{name}`: rc={info.get('rc')}, "
                         f"skipped={info.get('skipped')}, {info.get('seconds')} s")
    lines.append("")
    for (op,), rows in _by(data["rows"], "op").items():
        na = _never_ran(rows)
        provs = [p for p in OrderedDict.fromkeys(r["provider"] for r in rows) if p not in na]
        lines += [f"## {op}", ""]
        for mode in MODES:
            mrows = [r for r in rows if r["mode"] == mode]
            if not mrows:
                continue
            lines += [f"### {op} — {mode} (ms)", "",
                      "| case | " + " | ".join(provs) + " |",
                      "|---|" + "---|" * len(provs)]
            for (case,), crs in _by(mrows, "case").items():
                cells = {r["provider"]: _cell(r) for r in crs}
                lines.append(f"| {case} | " + " | ".join(cells.get(p, "") for p in provs) + " |")
            lines.append("")
        if na:
            lines.append("Not run for this op: " + "; ".join(f"`{p}` ({why})"
                                                            for p, why in na.items()))
            lines.append("")
        notes = OrderedDict()
        for r in rows:
            if r.get("note") and r["provider"] not in notes:
                notes[r["provider"]] = r["note"]
        if notes:
            lines += ["Notes: " + "; ".join(f"`{p}`: {n}" for p, n in notes.items()), ""]
        bad = [r for r in rows if r["status"].startswith(("ERROR", "OOM", "WRONG"))]
        if bad:
            lines += ["Failures:", ""]
            for r in bad:
                lines.append(f"- {r['case']} / {r['provider']} / {r['mode']}: {r['status']}")
            lines.append("")
    lines += ratio_lines(data)
    return "\n".join(lines) + "\n"


def ratio_lines(data: dict) -> list:
    """The ratios a script computed (bench_varlen.py), reported, not asserted."""
    out = []
    for name, info in data.get("scripts", {}).items():
        res = info.get("ratios")
        if not res:
            continue
        out += [f"## ratios of `{name}` ({res.get('note', '')})", "",
                "| case | mode | ratio (> 1: ours faster) | value |", "|---|---|---|---|"]
        out += [f"| {r['case']} | {r['mode']} | {r['ratio']} | {r['value']} |"
                for r in res["time"]]
        if res.get("memory_growth"):
            out += ["", "| case | mode | provider | extra MB half -> full | growth | "
                        "total_q x total_k growth |", "|---|---|---|---|---|---|"]
            out += [f"| {r['case']} | {r['mode']} | {r['provider']} | {r['extra_mb_half']} -> "
                    f"{r['extra_mb']} | {r['growth']}x | {r['total_q_x_total_k_growth']}x |"
                    for r in res["memory_growth"]]
        out.append("")
    return out


def summary(data: dict) -> str:
    """The first case of each op, fwd and fwd+bwd, every provider that ran."""
    out = []
    for (op,), rows in _by(data["rows"], "op").items():
        first = rows[0]["case"]
        crow = [r for r in rows if r["case"] == first and r["mode"] in ("fwd", "fwd+bwd")
                and not r["status"].startswith("n/a")]
        out.append(f"{op} / {first}")
        for (prov,), rs in _by(crow, "provider").items():
            cells = "  ".join(f"{r['mode']}={_cell(r)}" for r in rs)
            out.append(f"  {prov:22s} {cells}")
    m = data["meta"]
    head = (f"SUMMARY {m.get('device_name')} torch {m.get('torch')} triton {m.get('triton')} "
            f"copy {m.get('copy_gbps')} GB/s matmul {m.get('matmul_tflops')} TFLOP/s"
            + ("  [SMOKE: not measurements]" if m.get("smoke") else ""))
    for name, info in data.get("scripts", {}).items():  # the headline ratios only
        for r in (info.get("ratios") or {}).get("time", []):
            if r["ratio"].startswith("flex+mask") and r["mode"] in ("fwd", "fwd+bwd"):
                out.append(f"  ratio {r['case']} {r['mode']}: {r['ratio']} = {r['value']}")
    return "\n".join([head, *out])


def plots(data: dict, stem: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"[report] no PNG plots: matplotlib is not importable ({exc})")
        return []
    made = []
    smoke = " (SMOKE: not measurements)" if data["meta"].get("smoke") else ""

    def plot(rows, xkey, title, fname, xlabel):
        rows = [r for r in rows if r["status"] == "ok"]
        if not rows:
            return
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for (prov,), rs in _by([r for r in rows if r["mode"] == mode], "provider").items():
                pts = sorted((r["config"][xkey], r["ms"]) for r in rs)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{mode}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title + smoke)
        fig.tight_layout()
        path = f"{stem}-{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    rows = data["rows"]
    pg = [r for r in rows if r["op"] == "partial_global"]
    plot([r for r in pg if r.get("group") == "paper"], "B",
         "partial-global, Nv=576: time vs batch", "pg-time-vs-batch", "batch B")
    if pg:
        b_fix = 4 if any(r["config"]["B"] == 4 for r in pg) else min(r["config"]["B"] for r in pg)
        plot([r for r in pg if r["config"]["B"] == b_fix], "Nv",
             f"partial-global, B={b_fix}: time vs Nv", "pg-time-vs-nv", "visual tokens Nv")
    band = [r for r in rows if r["op"] == "band"]
    for r in band:
        r["config"]["width"] = r["config"]["window"][0] + r["config"]["window"][1] + 1
    plot(band, "width", "band (cascade windows): time vs window width", "band-time-vs-width",
         "window width")
    for p in made:
        print(f"[report] wrote {p}")
    return made


def write_markdown(json_path: str) -> str:
    """``<same name>.md`` beside the JSON (no plots: fast, for the refresh after each script)."""
    data = load(json_path)
    md_path = (json_path[:-5] if json_path.endswith(".json") else json_path) + ".md"
    with open(md_path + ".tmp", "w") as f:
        f.write(markdown(data))
    import os
    os.replace(md_path + ".tmp", md_path)
    return md_path


def make_report(json_path: str) -> tuple:
    md_path = write_markdown(json_path)
    print(f"[report] wrote {md_path}")
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return md_path, plots(load(json_path), stem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--summary", action="store_true")
    a = p.parse_args(argv)
    if a.summary:
        print(summary(load(a.json)))
        return 0
    make_report(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
