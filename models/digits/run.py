"""The digit-grid detail-perception study: one tiny MLLM per projector, trained from scratch.

    python -m models.digits.run --profile cpu --out benchmarks/results/digits_cpu
    python -m models.digits.run --profile gpu --out runs/digits_gpu      # one GPU, minutes
    python -m models.digits.run --profile auto ...                      # gpu if CUDA, else cpu

For each projector (``pargo``, ``qformer``, ``deco``, ``mlp2x_gelu``) the same tiny MLLM -- a
CLIP-style ViT (``CLIPVisionConfig``) and a Llama-style LM (``LlamaConfig``), both built with
fresh weights, word-level tokenizer over the dataset's words -- is trained end to end (tower +
projector + LLM: the trainer's ``stage=2, llm_mode="full", tune_vision_tower=True``) with
:func:`models.train.train` on the :mod:`models.digits.dataset` training set, then scored by
exact match of its greedy answers on the test set, per question type.

Visual-token budget: with a ``R x C`` digit grid and a ``2R x 2C`` patch grid, ParGo gets ``R*C``
partial queries on an ``R x C`` partial grid plus 1 global query, the Q-Former ``R*C + 1``
queries, DeCo an ``R x C`` pooled grid (``R*C`` tokens: its pooled grid must tile the patch grid),
and the MLP necessarily keeps every patch (``4*R*C`` tokens).

Writes to ``--out``: ``results.md`` (the table, also printed), ``results.json`` (everything,
loss curves included), ``loss_curves.png``, ``accuracy.png`` and ``relevance.png``
(:mod:`models.digits.relevance` maps on a few test questions).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

PROJECTORS = ("pargo", "qformer", "deco", "mlp2x_gelu")

# n_train: training images (one question of each of `qtypes` per image); steps x batch: training
# samples seen
PROFILES = {
    "cpu": dict(n_train=3000, n_test=150, grid=(3, 3), upsample=1, patch=4, vision_hidden=64,
                vision_layers=2, vision_heads=4, llm_hidden=64, llm_layers=2, llm_heads=4,
                proj_hidden=64, proj_layers=2, proj_heads=4, steps=1000, batch=16, lr=2e-3,
                qtypes=("read", "local"), proj_init="torch",
                warmup_ratio=0.05, weight_decay=0.01, eval_batch=150, log_every=100,
                n_relevance=4, n_relevance_score=40, cpu_threads=1),
    "gpu": dict(n_train=20000, n_test=500, grid=(4, 4), upsample=1, patch=4,
                vision_hidden=192, vision_layers=4, vision_heads=6, llm_hidden=256,
                llm_layers=4, llm_heads=8, proj_hidden=192, proj_layers=2, proj_heads=6,
                steps=3000, batch=64, lr=1e-3, warmup_ratio=0.05, weight_decay=0.01,
                proj_init="torch",
                eval_batch=500, log_every=250, n_relevance=4, n_relevance_score=200),
    # a few steps of everything, for tests
    "tiny": dict(n_train=32, n_test=8, grid=(3, 3), upsample=1, patch=4, vision_hidden=32,
                 vision_layers=1, vision_heads=2, llm_hidden=32, llm_layers=1, llm_heads=2,
                 proj_hidden=32, proj_layers=1, proj_heads=2, steps=3, batch=8, lr=1e-3,
                 warmup_ratio=0.0, weight_decay=0.0, eval_batch=32, log_every=1,
                 n_relevance=2, n_relevance_score=4, cpu_threads=1),
}


def resolve_profile(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)} or 'auto', got {name!r}")
    return name


def projector_kwargs(name: str, p: dict, impl: str) -> dict:
    """Constructor arguments of projector ``name`` at the study's visual-token budget."""
    grid = tuple(p["grid"])
    n = grid[0] * grid[1]
    q = dict(n_layers=p["proj_layers"], hidden=p["proj_hidden"], heads=p["proj_heads"],
             intermediate=2 * p["proj_hidden"], impl=impl)
    if name == "pargo":
        return dict(n_partial=n, n_global=1, partial_grid=list(grid), **q)
    if name == "qformer":
        return dict(n_query=n + 1, **q)
    if name == "deco":
        return dict(query_grid=list(grid), impl=impl)
    if name in ("mlp2x_gelu", "linear"):
        return {}
    raise ValueError(f"no study settings for projector {name!r}")


def components(p: dict, words, image_size) -> dict:
    """Fresh tiny configs (tower, LM), the word-level tokenizer and the image processor."""
    import transformers as tf

    from ..mllm import default_image_processor, word_level_tokenizer
    if image_size[0] != image_size[1]:
        raise ValueError(f"the study needs square images, got {image_size}")
    tok = word_level_tokenizer(words)
    vc = tf.CLIPVisionConfig(image_size=image_size[0], patch_size=p["patch"],
                             hidden_size=p["vision_hidden"],
                             intermediate_size=2 * p["vision_hidden"],
                             num_hidden_layers=p["vision_layers"],
                             num_attention_heads=p["vision_heads"])
    lc = tf.LlamaConfig(vocab_size=len(tok), hidden_size=p["llm_hidden"],
                        intermediate_size=2 * p["llm_hidden"],
                        num_hidden_layers=p["llm_layers"], num_attention_heads=p["llm_heads"],
                        num_key_value_heads=p["llm_heads"], max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return {"vision_tower": vc, "llm": lc, "tokenizer": tok,
            "image_processor": default_image_processor(vc)}


@torch.no_grad()
def evaluate(model, records: list[dict], image_folder, batch_size: int,
             template: str = "vicuna_v1", max_new_tokens: int = 3) -> dict:
    """Exact match of the greedy answers: ``{"by_type": {qtype: acc}, "overall", "answers"}``."""
    from .dataset import batches, score
    model.eval()
    preds = []
    for _, images, qs in batches(records, image_folder, batch_size):
        preds += model.chat(images, qs, max_new_tokens=max_new_tokens, template=template)
    by_type: dict[str, list[bool]] = {}
    for r, a in zip(records, preds):
        by_type.setdefault(r["qtype"], []).append(score(r["qtype"], a, r["answer"]))
    acc = {t: sum(v) / len(v) for t, v in by_type.items()}
    ok = [x for v in by_type.values() for x in v]
    return {"by_type": acc, "overall": sum(ok) / len(ok), "answers": preds}


def _progress(name: str, total: int, every: int):
    def cb(rec):
        s = rec["step"]
        if s % every == 0 or s == total or s == 1:
            print(f"[{name:>10}] step {s:5d}/{total} loss {rec['loss']:.4f} "
                  f"lr {rec['lr']:.2e} {rec['time']:7.1f}s", flush=True)
    return cb


def run_projector(name: str, p: dict, data: dict, work: Path, device_impl: str,
                  test_records: list[dict], seed: int) -> tuple[dict, object]:
    from ..mllm import MLLM
    from ..mllm.train import train
    comp = components(p, data["words"], data["image_size"])
    torch.manual_seed(seed)
    model = MLLM.build(comp["vision_tower"], comp["llm"], name, tokenizer=comp["tokenizer"],
                       image_processor=comp["image_processor"],
                       projector_kwargs=projector_kwargs(name, p, device_impl),
                       vision_feature_layer=-1, freeze_vision_tower=False)
    if p.get("proj_init") == "torch":
        # PyTorch's default (fan-in) init for every Linear of the projector instead of BERT's
        # N(0, 0.02): trained from scratch next to a from-scratch LLM, the query projectors'
        # visual signal otherwise starts so small that the LLM settles on the answer prior.
        for m in model.projector.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
    n_params = {k: sum(x.numel() for x in getattr(model, k).parameters())
                for k in ("vision_tower", "projector", "llm")}
    cfg = dict(output_dir=str(work / name), data_path=str(data["train"]),
               image_folder=str(data["image_folder"]), stage=2, unfreeze_mm_vision_tower=True,
               projector=name, mm_vision_select_layer=-1, max_steps=p["steps"],
               per_device_train_batch_size=p["batch"], learning_rate=p["lr"],
               warmup_ratio=p["warmup_ratio"], weight_decay=p["weight_decay"],
               lr_scheduler_type="cosine", model_max_length=512, disable_tqdm=True, seed=seed,
               version=p.get("template", "vicuna_v1"), save_strategy="no",
               bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    t0 = time.time()
    res = train(cfg, model=model, on_step=_progress(name, p["steps"], p["log_every"]))
    t_train = time.time() - t0
    t0 = time.time()
    n_cells = p["grid"][0] * p["grid"][1]
    ev = evaluate(model, test_records, data["image_folder"], p["eval_batch"],
                  template=p.get("template", "vicuna_v1"), max_new_tokens=n_cells + 2)
    t_eval = time.time() - t0
    print(f"[{name:>10}] test accuracy {ev['overall']:.3f} "
          + " ".join(f"{k} {v:.3f}" for k, v in ev["by_type"].items())
          + f" (train {t_train:.1f}s, eval {t_eval:.1f}s)", flush=True)
    out = {"projector": name, "visual_tokens": model.num_visual_tokens,
           "projector_kwargs": projector_kwargs(name, p, device_impl), "params": n_params,
           "accuracy": ev["by_type"], "overall": ev["overall"], "losses": res["losses"],
           "final_loss": res["loss"], "train_s": t_train, "eval_s": t_eval,
           "samples_per_s": res["samples_per_s"],
           "answers": ev["answers"]}
    return out, model


# ---------------------------------------------------------------------------------- reporting
QTYPE_TITLES = {"read": "read all (per digit)", "local": "local (row, col)", "count": "count", "relation": "relation (yes/no)",
                "neighbor": "neighbor digit"}


def results_table(results: dict) -> str:
    from .dataset import QTYPES
    chance = results["chance"]
    qt = [t for t in QTYPES if t in chance]
    hdr = ["projector", "visual tokens", *(QTYPE_TITLES[t] for t in qt), "overall",
           "final train loss", "train s", "eval s"]
    has_rel = any("relevance_in_cell" in r for r in results["projectors"])
    if has_rel:
        hdr.append("relevance in asked cell")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results["projectors"]:
        tok = str(r["visual_tokens"])
        if r["projector"].startswith("mlp"):
            tok += " (all patches)"
        row = [r["projector"], tok, *(f"{r['accuracy'].get(t, float('nan')):.3f}" for t in qt),
               f"{r['overall']:.3f}", f"{r['final_loss']:.3f}", f"{r['train_s']:.0f}",
               f"{r['eval_s']:.0f}"]
        if has_rel:
            v = r.get("relevance_in_cell")
            row.append("" if v is None else f"{v:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    cells = results["grid"][0] * results["grid"][1]
    for key, label in (("uniform", "chance: uniform guess"),
                       ("majority", "chance: majority answer")):
        row = [label, "", *(f"{chance[t][key]:.3f}" for t in qt),
               f"{sum(chance[t][key] for t in qt) / len(qt):.3f}", "", "", ""]
        if has_rel:
            row.append(f"{1 / cells:.3f}" if key == "uniform" else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> str:
    p = results["profile_settings"]
    table = results_table(results)
    n_test = results["n_test_questions"]
    from .dataset import QTYPES
    qtypes = list(p.get("qtypes", QTYPES))
    md = [f"# Digit-grid detail perception (`--profile {results['profile']}`)", "",
          f"Tiny MLLM trained from scratch (tower + projector + LLM) per projector; "
          f"{p['n_train']} training images ({p['grid'][0]}x{p['grid'][1]} handwritten digits "
          f"from scikit-learn's `load_digits`, {results['image_size'][0]} px, "
          f"{len(qtypes)} questions each: {', '.join(qtypes)}), "
          f"{p['steps']} steps x batch {p['batch']}; test: {n_test} questions on "
          f"{p['n_test']} images of unseen handwriting samples; exact match of the greedy "
          f"answer ('read': the share of the cells read right, in order). Patch grid "
          f"{results['visual_grid'][0]}x{results['visual_grid'][1]}. Projector Linear layers: "
          f"{'PyTorch default (fan-in) init' if p.get('proj_init') == 'torch' else 'as built'}.",
          "",
          table, "",
          "Visual tokens: ParGo = one partial query per digit cell (partial grid "
          f"{p['grid'][0]}x{p['grid'][1]}) + 1 global; Q-Former = the same number of global "
          "queries; DeCo = adaptive average pooling to the digit grid (one token fewer: its "
          "pooled grid must tile the patch grid); MLP keeps every patch token.",
          "Chance: uniform = 1 / number of possible answers; majority = always giving the most "
          "frequent test answer (overall = mean over types). 'relevance in asked cell': share "
          "of the relevance map (models/digits/relevance.py) inside the cell that a local "
          "question asks about, mean over test local questions (uniform map = 1 / cells).", "",
          f"Wall-clock: {results['wall_clock_s']:.0f} s in all (dataset build "
          f"{results['dataset_s']:.1f} s) on {results['device']}; torch {results['torch']}.",
          "", "Plots: `loss_curves.png`, `accuracy.png`, `relevance.png`.", "",
          f"Command: `{results['command']}`", ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    return table


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .dataset import QTYPES
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=80)
    for r in results["projectors"]:
        y = np.asarray(r["losses"], float)
        k = max(1, len(y) // 50)
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(ys)) + k, ys, label=r["projector"], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (answer tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"digit grid, profile {results['profile']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)

    qt = [t for t in QTYPES if t in results["chance"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=80)
    w = 0.8 / len(results["projectors"])
    x = np.arange(len(qt))
    for i, r in enumerate(results["projectors"]):
        ax.bar(x + (i - (len(results["projectors"]) - 1) / 2) * w,
               [r["accuracy"].get(t, 0.0) for t in qt], w,
               label=f"{r['projector']} ({r['visual_tokens']} tok)")
    for j, t in enumerate(qt):
        ax.hlines(results["chance"][t]["majority"], j - 0.45, j + 0.45, colors="k",
                  linestyles="--", lw=1, label="majority-answer chance" if j == 0 else None)
    ax.set_xticks(x, [QTYPE_TITLES[t] for t in qt], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test exact match")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def run_study(profile: str = "cpu", out="benchmarks/results/digits_cpu", *,
              projectors=PROJECTORS, overrides: dict | None = None, seed: int = 0,
              keep_runs: bool = False, command: str | None = None) -> dict:
    """Build the data, train and score every projector, write the report. Returns the results
    dict (also ``out/results.json``)."""
    from .dataset import QTYPES, build_digit_dataset
    from .relevance import relevance_study, save_relevance_figure
    t_start = time.time()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # "Writing model shards" bars of each checkpoint
    except ImportError:
        pass
    name = resolve_profile(profile)
    p = {**PROFILES[name], **(overrides or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digits_", dir=out if keep_runs else None))
    cuda = torch.cuda.is_available()
    impl = "kernels" if cuda else "reference"
    threads = torch.get_num_threads()
    if not cuda and p.get("cpu_threads"):
        # the models are so small that OpenMP synchronisation dominates: one thread is several
        # times faster than two on a 2-core machine (and far faster when the cores are shared)
        torch.set_num_threads(p["cpu_threads"])
    try:
        t0 = time.time()
        data = build_digit_dataset(work / "data", n_train=p["n_train"], n_test=p["n_test"],
                                   grid=p["grid"], upsample=p["upsample"], seed=seed,
                                   multi_turn=p.get("multi_turn", True),
                                   question_first=p.get("question_first", False),
                                   qtypes=p.get("qtypes", QTYPES))
        t_data = time.time() - t0
        with open(data["test"]) as f:
            test_records = json.load(f)
        side = data["image_size"][0] // p["patch"]
        print(f"profile {name}: {p['n_train']} train images, {len(test_records)} test "
              f"questions, image {data['image_size'][0]} px, patch grid {side}x{side}, "
              f"dataset built in {t_data:.1f}s", flush=True)
        results = {"profile": name, "profile_settings": p, "chance": data["chance"],
                   "grid": list(p["grid"]), "image_size": list(data["image_size"]),
                   "visual_grid": [side, side], "n_test_questions": len(test_records),
                   "dataset_s": t_data, "projectors": [],
                   "device": (torch.cuda.get_device_name() if cuda else
                              f"CPU ({torch.get_num_threads()} threads, "
                              f"{platform.processor() or platform.machine()})"),
                   "torch": torch.__version__, "seed": seed,
                   "command": command or f"python -m models.digits.run --profile {profile} "
                                         f"--out {out}"}
        rel_maps = {}
        rel_samples = [r for r in test_records if r["qtype"] == "local"]
        for proj in projectors:
            r, model = run_projector(proj, p, data, work, impl, test_records, seed)
            rel = relevance_study(model, rel_samples[:max(p["n_relevance_score"],
                                                          p["n_relevance"])],
                                  data["image_folder"], p["grid"])
            r["relevance_in_cell"] = rel["in_cell"]
            r["relevance_method"] = rel["method"]
            rel_maps[proj] = rel["maps"][:p["n_relevance"]]
            results["projectors"].append(r)
            del model
        save_relevance_figure(out / "relevance.png", rel_samples[:p["n_relevance"]],
                              data["image_folder"], rel_maps)
        results["wall_clock_s"] = time.time() - t_start
        table = write_report(results, out)
        plot(results, out)
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=1)
    finally:
        torch.set_num_threads(threads)
        if not keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table)
    print(f"\nwall-clock {results['wall_clock_s']:.0f}s; wrote {out}/results.md, results.json, "
          "loss_curves.png, accuracy.png, relevance.png")
    return results


def main(argv=None) -> None:
    import sys
    ap = argparse.ArgumentParser(prog="python -m models.digits.run",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="auto", choices=[*PROFILES, "auto"])
    ap.add_argument("--out", default=None,
                    help="output folder (default runs/digits_<profile>, git-ignored)")
    ap.add_argument("--projectors", default=",".join(PROJECTORS),
                    help="comma-separated registry names")
    ap.add_argument("--steps", type=int, default=None, help="override the profile's steps")
    ap.add_argument("--n_train", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None, help="override the global batch")
    ap.add_argument("--grid", default=None, help="override the digit grid, e.g. 2x2")
    ap.add_argument("--layout", default=None, choices=["multi", "single", "single_qfirst"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep_runs", action="store_true",
                    help="keep the data and checkpoints under <out>/digits_*")
    a = ap.parse_args(argv)
    name = resolve_profile(a.profile)
    out = a.out or f"runs/digits_{name}"
    grid = tuple(int(g) for g in a.grid.split("x")) if a.grid else None
    over = {k: v for k, v in (("grid", grid),) if v is not None}
    if a.layout:
        over.update(multi_turn=a.layout.startswith("multi"),
                    question_first=a.layout.endswith("qfirst"))
    over |= {k: v for k, v in (("steps", a.steps), ("n_train", a.n_train), ("lr", a.lr),
                                         ("batch", a.batch))
            if v is not None}
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    run_study(a.profile, out, projectors=[s for s in a.projectors.split(",") if s],
              overrides=over, seed=a.seed, keep_runs=a.keep_runs,
              command=f"python -m models.digits.run {argv_s}".strip())


if __name__ == "__main__":
    main()
