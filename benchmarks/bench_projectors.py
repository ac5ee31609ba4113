"""Benchmark: one training step (forward + backward + AdamW step) of every projector, with the
fast ops (``impl="kernels"``) and with the dense-mask eager path (``impl="reference"``), and the
peak memory of the step.

Shape (issue 7): B=256, visual grid 24x24 (Nv=576, CLIP ViT-L/14-336), vision width 1024 ->
LLM width 4096, bf16 weights and inputs, each projector at its papers' default size (ParGo:
288 + 16 queries, 6 bert-small layers; Q-Former: 304 queries, 6 layers; DeCo: 144 tokens;
C-Abstractor: 144 tokens; MLP / linear: 576 tokens). ``--smoke``: tiny, CPU.

Before timing, the kernels path's output is checked against the reference path's on the same
weights and input (max error relative to max |output|, bf16 budget 3e-2): a mismatch is
recorded WRONG and not timed.

    python benchmarks/bench_projectors.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402

FULL = dict(B=256, grid=(24, 24), vision=1024, llm=4096)
SMOKE = dict(B=2, grid=(6, 8), vision=24, llm=40)
SMOKE_CFG = {
    "pargo": dict(n_partial=12, n_global=4, n_layers=2, hidden=32, heads=2, intermediate=48),
    "qformer": dict(n_query=8, n_layers=2, hidden=32, heads=2, intermediate=48),
    "deco": dict(query_num=9), "cabstractor": dict(num_queries=9, hidden=16, depth=1),
    "mlp2x_gelu": {}, "linear": {},
}
WITH_IMPL = ("pargo", "qformer", "deco", "cabstractor")
CHECK_TOL = 3e-2


def step_fn(proj, opt, x, g, impl):
    def step():
        opt.zero_grad(set_to_none=True)
        y = proj(x, impl=impl) if impl else proj(x)
        y.backward(g)
        opt.step()
    return step


def run(args, rows: list, on_row=lambda rows: None) -> list[dict]:
    """Appends a row per projector and impl to ``rows`` (calling ``on_row(rows)`` after each:
    results on disk as they are measured); returns ``rows``."""
    import models
    shape = SMOKE if args.smoke else FULL
    dev, dt = args.device, args.dtype_t
    names = list(SMOKE_CFG)[:3] if args.quick else list(SMOKE_CFG)
    for name in names:
        cfg = SMOKE_CFG[name] if args.smoke else {}
        if args.smoke and name in WITH_IMPL and common.triton_interpret():
            cfg = {**cfg, "backend": "triton"}  # the real kernels, under the interpreter
        torch.manual_seed(0)
        proj = models.build_projector(name, vision_width=shape["vision"], llm_width=shape["llm"],
                                      visual_grid=shape["grid"], **cfg).to(dev, dt)
        nv = shape["grid"][0] * shape["grid"][1]
        x = torch.randn(shape["B"], nv, shape["vision"], device=dev, dtype=dt)
        g = torch.randn(shape["B"], proj.num_visual_tokens, shape["llm"], device=dev, dtype=dt)
        impls = ("kernels", "reference") if name in WITH_IMPL else (None,)
        err = None
        if name in WITH_IMPL:
            with torch.no_grad():
                yk, yr = proj(x, impl="kernels").float(), proj(x, impl="reference").float()
            err = ((yk - yr).abs().max() / yr.abs().max().clamp_min(1e-6)).item()
            del yk, yr
        params = sum(p.numel() for p in proj.parameters())
        for impl in impls:
            row = dict(op="projector_train_step", case=name, provider=impl or "torch",
                       mode="fwd+bwd+adamw", status="ok", err=err, tol=CHECK_TOL,
                       config=dict(**{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in shape.items()}, dtype=args.dtype,
                                   num_visual_tokens=proj.num_visual_tokens, params=params,
                                   projector=proj.config))
            if common.over_budget(args):
                row["status"] = "SKIPPED (budget)"
                rows.append(row)
                on_row(rows)
                continue
            if err is not None and impl == "kernels" and not err <= CHECK_TOL:
                row["status"] = "WRONG"
                rows.append(row)
                on_row(rows)
                continue
            opt = torch.optim.AdamW(proj.parameters(), lr=1e-5)
            step = step_fn(proj, opt, x, g, impl)
            try:
                step()  # compile / allocate the optimizer state
                common.sync(dev)
                t0 = time.perf_counter()
                row["ms"], row["ms_p20"], row["ms_p80"] = common.bench(step, args)
                row["peak_mb"], row["extra_mb"] = common.measure_memory(step, dev)
                row["bench_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row["status"] = "OOM" if common.is_oom(exc) else f"ERROR {type(exc).__name__}"
                row["note"] = str(exc).splitlines()[0][:200] if str(exc) else ""
            rows.append(row)
            on_row(rows)
            print(f"[projectors] {name:12s} {row['provider']:9s} {row['status']:8s} "
                  f"{row.get('ms') or float('nan'):9.3f} ms  peak {row.get('peak_mb') or 0:8.0f} MB"
                  f"  err {err if err is not None else float('nan'):.1e}", flush=True)
            del opt
            common.free_memory(dev, full=True)
    return rows


def markdown(rows, facts) -> str:
    lines = [f"# Projector training step ({facts['device_name']}, "
             f"{facts['dtype']}, B={FULL['B'] if not facts['smoke'] else SMOKE['B']})", "",
             f"torch {facts['torch']}, triton {facts.get('triton')}, git {facts['git_sha']}, "
             f"{facts['date_utc']}", "",
             "| projector | tokens | impl | status | step ms (p20-p80) | peak MB | "
             "kernels vs reference |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.2f} ({r['ms_p20']:.2f}-{r['ms_p80']:.2f})" if r.get("ms") else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "-"
        err = f"{r['err']:.1e}" if r.get("err") is not None else "-"
        lines.append(f"| {r['case']} | {r['config']['num_visual_tokens']} | {r['provider']} | "
                     f"{r['status']} | {ms} | {peak} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    # started in the background by gpu_run.sh, SIGINT would be ignored: `timeout -s INT` must
    # reach the KeyboardInterrupt below (results so far written)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    common.finish_args(args)
    facts = common.device_facts(args)
    os.makedirs(args.out, exist_ok=True)
    tag = "smoke" if args.smoke else facts["device_slug"]
    base = os.path.join(args.out, f"projectors-{tag}")

    def write(rows):  # after every row: a killed run keeps what it measured
        for ext, text in ((".json", json.dumps(dict(facts=facts, rows=rows), indent=1,
                                                default=str)), (".md", markdown(rows, facts))):
            with open(base + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(base + ext + ".tmp", base + ext)
    rows = []
    try:
        run(args, rows, write)
    except KeyboardInterrupt:  # timeout -s INT: keep what was measured, say so
        print("[projectors] interrupted: results so far written", flush=True)
        write(rows)
        return 130
    write(rows)
    print(markdown(rows, facts))
    bad = [r for r in rows if r["status"] == "WRONG" or r["status"].startswith("ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
