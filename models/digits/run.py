"""The digit-grid detail-perception study: one tiny MLLM per projector, learning-rate sweep and
seeds, on a frozen pretrained tower.

    python -m models.digits.run --profile cpu                 # `make run`: seed 0, lr 2e-3, minutes
    nice -n 10 python -m models.digits.run --profile cpu-study \
        --out benchmarks/results/digits_cpu_study             # 3 seeds x rate sweep (~1 h)
    python -m models.digits.run --profile gpu --out runs/digits_gpu
    python -m models.digits.run --profile auto ...            # gpu if CUDA, else cpu

Data (:mod:`models.digits.dataset`): 4x4 grids of scikit-learn handwritten digits on a 9 px pitch
with random sub-cell offsets (36 px), 6 px patches (6x6 patch grid): no projector's windows (ParGo
3x3 partial grid, DeCo 3x3 pooling) line up with the digit cells.

Tower (:mod:`models.digits.tower`): a CLIP-style ViT pretrained on the training images by per-patch
digit / background classification, then frozen for every projector (``--tower scratch``: trained
from scratch with everything else instead). LLM: a Llama-style LM with fresh weights and a
word-level tokenizer. For each projector (``pargo``, ``qformer``, ``deco``, ``mlp2x_gelu``) the
projector and the LLM are trained with the MLLM trainer (:func:`train_mllm`, the study's only call
into the trainer / MLLM), then scored by exact match of greedy answers per question type.

Protocol: every learning rate of the profile's ``lrs`` is run with the first seed; the rate with
the best mean validation accuracy (validation images, never the test set) is kept per projector,
and run with the other ``seeds``; the table gives test accuracy mean +- std over the seeds at that
rate. Runs are ordered so that a cut-off run is still usable: the first rate with every seed
first, then the rest of the sweep, then the other seeds at a rate validation picked instead. A run whose validation accuracy stays within 0.05 of the majority answer on every question
type is flagged as on the answer-prior plateau.

Writes to ``--out`` (after every run, so a cut-off run still leaves data): ``results.md``,
``results.json`` (every run, loss curves included), ``loss_curves.png``, ``accuracy.png`` and
``relevance.png`` (:mod:`models.digits.relevance` maps on a few test questions).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROJECTORS = ("pargo", "qformer", "deco", "mlp2x_gelu")
PLATEAU_MARGIN = 0.05

# n_train: training images (one conversation each, `train_repeats` questions per type); steps x
# batch: training conversations seen; tower_*: the tower's pretraining stage
_CPU = dict(n_train=3000, n_val=100, n_test=200, grid=(4, 4), pitch=9, upsample=1, patch=6,
            vision_hidden=64, vision_layers=2, vision_heads=4, llm_hidden=64, llm_layers=2,
            llm_heads=4, proj_hidden=64, proj_layers=2, proj_heads=4, steps=800, batch=16,
            lrs=(2e-3,), seeds=(0,), qtypes=("read", "row", "cell"), train_repeats={"cell": 3},
            proj_init="torch", tower="pretrained", tower_steps=800, tower_batch=32,
            tower_lr=3e-3, warmup_ratio=0.05, weight_decay=0.01, eval_batch=200,
            log_every=100, n_relevance=4, n_relevance_score=40, cpu_threads=1)
PROFILES = {
    "cpu": _CPU,
    "cpu-study": {**_CPU, "lrs": (4e-3, 2e-3, 8e-3), "seeds": (0, 1, 2)},
    "gpu": dict(n_train=20000, n_val=300, n_test=500, grid=(4, 4), pitch=9, upsample=2, patch=6,
                vision_hidden=192, vision_layers=4, vision_heads=6, llm_hidden=256,
                llm_layers=4, llm_heads=8, proj_hidden=192, proj_layers=2, proj_heads=6,
                steps=3000, batch=64, lrs=(5e-4, 1e-3, 2e-3), seeds=(0, 1, 2),
                qtypes=("read", "row", "cell", "local", "count", "relation", "neighbor"),
                train_repeats={"cell": 2}, proj_init="torch", tower="pretrained",
                tower_steps=2000, tower_batch=64, tower_lr=1e-3, warmup_ratio=0.05,
                weight_decay=0.01, eval_batch=500, log_every=250, n_relevance=4,
                n_relevance_score=200),
    # a few steps of everything, for tests
    "tiny": dict(n_train=32, n_val=6, n_test=8, grid=(4, 4), pitch=9, upsample=1, patch=6,
                 vision_hidden=32, vision_layers=1, vision_heads=2, llm_hidden=32, llm_layers=1,
                 llm_heads=2, proj_hidden=32, proj_layers=1, proj_heads=2, steps=3, batch=8,
                 lrs=(1e-3,), seeds=(0,), qtypes=("read", "row", "cell"), train_repeats={},
                 tower="pretrained", tower_steps=3, tower_batch=8, tower_lr=1e-3,
                 warmup_ratio=0.0, weight_decay=0.0, eval_batch=64, log_every=1,
                 n_relevance=2, n_relevance_score=4, cpu_threads=1),
}


def resolve_profile(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)} or 'auto', got {name!r}")
    return name


def projector_kwargs(name: str, p: dict, impl: str) -> dict:
    """Constructor arguments of projector ``name``: ParGo 3x3 partial queries + 1 global, the
    Q-Former as many queries, DeCo pooled to 3x3, the MLP every patch."""
    q = dict(n_layers=p["proj_layers"], hidden=p["proj_hidden"], heads=p["proj_heads"],
             intermediate=2 * p["proj_hidden"], impl=impl)
    if name == "pargo":
        return dict(n_partial=9, n_global=1, partial_grid=[3, 3], **q)
    if name == "qformer":
        return dict(n_query=10, **q)
    if name == "deco":
        return dict(query_grid=[3, 3], impl=impl)
    if name in ("mlp2x_gelu", "linear"):
        return {}
    raise ValueError(f"no study settings for projector {name!r}")


def components(p: dict, words, image_size) -> dict:
    """Fresh tiny configs (tower, LM), the vocabulary and the image processor (plain
    transformers objects; the tokenizer is built in :func:`train_mllm`)."""
    import transformers as tf
    if image_size[0] != image_size[1]:
        raise ValueError(f"the study needs square images, got {image_size}")
    vc = tf.CLIPVisionConfig(image_size=image_size[0], patch_size=p["patch"],
                             hidden_size=p["vision_hidden"],
                             intermediate_size=2 * p["vision_hidden"],
                             num_hidden_layers=p["vision_layers"],
                             num_attention_heads=p["vision_heads"])
    lc = dict(hidden_size=p["llm_hidden"], intermediate_size=2 * p["llm_hidden"],
              num_hidden_layers=p["llm_layers"], num_attention_heads=p["llm_heads"],
              num_key_value_heads=p["llm_heads"], max_position_embeddings=512,
              tie_word_embeddings=False)
    size = image_size[0]
    proc = tf.CLIPImageProcessor(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})
    return {"vision_tower": vc, "llm": lc, "words": list(words), "image_processor": proc}


# ------------------------------------------------------- the study's one call into the trainer
def train_mllm(tower, comp: dict, projector: str, projector_kwargs: dict, *, data_path,
               image_folder, output_dir, steps: int, batch: int, lr: float, seed: int,
               warmup_ratio: float, weight_decay: float, tune_vision_tower: bool,
               on_step=None, init=None):
    """Build the MLLM (``tower`` module + fresh Llama + ``projector``) and train it with the
    trainer: stage 2, full LLM, tower trained only when ``tune_vision_tower``. ``init(model)``
    runs before training. Returns ``(model, {"losses": per-step losses, "loss", "samples_per_s"})``.
    Everything the study needs from models.mllm (its model and trainer) is here."""
    import transformers as tf

    from ..mllm import MLLM, word_level_tokenizer
    from ..mllm.train import train
    tok = word_level_tokenizer(comp["words"])
    lc = tf.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        **comp["llm"])
    torch.manual_seed(seed)
    model = MLLM.build(tower, lc, projector, tokenizer=tok,
                       image_processor=comp["image_processor"],
                       projector_kwargs=projector_kwargs, vision_feature_layer=-1,
                       freeze_vision_tower=not tune_vision_tower)
    if init is not None:
        init(model)
    cfg = dict(output_dir=str(output_dir), data_path=str(data_path),
               image_folder=str(image_folder), stage=2, unfreeze_mm_vision_tower=tune_vision_tower,
               projector=projector, mm_vision_select_layer=-1, max_steps=steps,
               per_device_train_batch_size=batch, learning_rate=lr, warmup_ratio=warmup_ratio,
               weight_decay=weight_decay, lr_scheduler_type="cosine", model_max_length=512,
               disable_tqdm=True, seed=seed, version="vicuna_v1", save_strategy="no",
               bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    res = train(cfg, model=model, on_step=on_step)
    return model, {"losses": res["losses"], "loss": res["loss"],
                   "samples_per_s": res["samples_per_s"]}


@torch.no_grad()
def evaluate(model, records: list[dict], image_folder, batch_size: int,
             max_new_tokens: int = 3) -> dict:
    """Exact match of the greedy answers: ``{"by_type": {qtype: acc}, "overall", "answers"}``."""
    from .dataset import batches, score
    model.eval()
    preds = []
    for _, images, qs in batches(records, image_folder, batch_size):
        preds += model.chat(images, qs, max_new_tokens=max_new_tokens, template="vicuna_v1")
    by_type: dict[str, list[float]] = {}
    for r, a in zip(records, preds):
        by_type.setdefault(r["qtype"], []).append(score(r["qtype"], a, r["answer"]))
    acc = {t: sum(v) / len(v) for t, v in by_type.items()}
    return {"by_type": acc, "overall": sum(acc.values()) / len(acc), "answers": preds}


def on_plateau(val_acc: dict, chance: dict, margin: float = PLATEAU_MARGIN) -> bool:
    """True when no question type's validation accuracy beats its majority answer by ``margin``."""
    return all(val_acc[t] <= chance[t]["majority"] + margin for t in val_acc)


def _progress(name: str, total: int, every: int):
    def cb(rec):
        s = rec["step"]
        if s % every == 0 or s == total or s == 1:
            print(f"[{name:>16}] step {s:5d}/{total} loss {rec['loss']:.4f} "
                  f"lr {rec['lr']:.2e} {rec['time']:7.1f}s", flush=True)
    return cb


def _torch_init(model) -> None:
    # PyTorch's default (fan-in) init for every Linear of the projector instead of BERT's
    # N(0, 0.02): next to a from-scratch LLM the query projectors' visual signal otherwise
    # starts so small that the LLM settles on the answer prior.
    for m in model.projector.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()


def run_projector(name: str, p: dict, data: dict, comp: dict, tower, work: Path, impl: str,
                  evals: dict, *, lr: float, seed: int) -> tuple[dict, object]:
    """Train one (projector, rate, seed); score it on every set of ``evals`` (``{"val": records,
    "test": records}``)."""
    tag = f"{name} lr{lr:g} s{seed}"
    scratch = tower is None
    if scratch:
        import transformers as tf
        torch.manual_seed(seed)
        tower = tf.CLIPVisionModel(comp["vision_tower"])
    else:
        tower = copy.deepcopy(tower)
    t0 = time.time()
    model, res = train_mllm(
        tower, comp, name, projector_kwargs(name, p, impl), data_path=data["train"],
        image_folder=data["image_folder"], output_dir=work / f"{name}_{lr:g}_{seed}",
        steps=p["steps"], batch=p["batch"], lr=lr, seed=seed, warmup_ratio=p["warmup_ratio"],
        weight_decay=p["weight_decay"], tune_vision_tower=scratch,
        on_step=_progress(tag, p["steps"], p["log_every"]),
        init=_torch_init if p.get("proj_init") == "torch" else None)
    t_train = time.time() - t0
    t0 = time.time()
    n_cells = p["grid"][0] * p["grid"][1]
    ev = {k: evaluate(model, recs, data["image_folder"], p["eval_batch"], n_cells + 2)
          for k, recs in evals.items()}
    t_eval = time.time() - t0
    print(f"[{tag:>16}] val {ev['val']['overall']:.3f} test {ev['test']['overall']:.3f} "
          + " ".join(f"{k} {v:.3f}" for k, v in ev["test"]["by_type"].items())
          + f" (train {t_train:.1f}s, eval {t_eval:.1f}s)", flush=True)
    n_params = {k: sum(x.numel() for x in getattr(model, k).parameters())
                for k in ("vision_tower", "projector", "llm")}
    out = {"projector": name, "lr": lr, "seed": seed, "visual_tokens": model.num_visual_tokens,
           "projector_kwargs": projector_kwargs(name, p, impl), "params": n_params,
           "val": ev["val"]["by_type"], "val_overall": ev["val"]["overall"],
           "accuracy": ev["test"]["by_type"], "overall": ev["test"]["overall"],
           "plateau": on_plateau(ev["val"]["by_type"], data["chance_val"]),
           "losses": res["losses"], "final_loss": res["loss"], "train_s": t_train,
           "eval_s": t_eval, "samples_per_s": res["samples_per_s"],
           "answers": ev["test"]["answers"]}
    return out, model


def select_lr(runs: list[dict], projector: str, seed: int) -> float:
    """The rate whose ``seed`` run of ``projector`` has the best mean VALIDATION accuracy
    (ties: the smaller rate). Test scores play no part."""
    cand = [r for r in runs if r["projector"] == projector and r["seed"] == seed]
    if not cand:
        raise ValueError(f"no runs of {projector!r} with seed {seed}")
    return min(cand, key=lambda r: (-r["val_overall"], r["lr"]))["lr"]


def summarize(runs: list[dict], projectors, seeds, lr: float | None = None) -> list[dict]:
    """Per projector: the rate selected on validation (or the given ``lr``) and the test accuracy
    mean / std over the seeds run at it (``n_seeds`` may be short of ``len(seeds)`` in a cut-off
    run)."""
    out = []
    fixed = lr
    for name in projectors:
        if not any(r["projector"] == name and r["seed"] == seeds[0] for r in runs):
            continue
        lr = select_lr(runs, name, seeds[0]) if fixed is None else fixed
        if not any(r["projector"] == name and r["lr"] == lr for r in runs):
            continue
        at = [r for r in runs if r["projector"] == name and r["lr"] == lr]
        types = list(at[0]["accuracy"])

        def ms(vals):
            return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rel = [r["relevance_in_cell"] for r in at if r.get("relevance_in_cell") is not None]
        out.append({"projector": name, "lr": lr, "n_seeds": len(at),
                    "seeds": [r["seed"] for r in at], "visual_tokens": at[0]["visual_tokens"],
                    "accuracy": {t: ms([r["accuracy"][t] for r in at]) for t in types},
                    "overall": ms([r["overall"] for r in at]),
                    "val_overall": ms([r["val_overall"] for r in at]),
                    "final_loss": ms([r["final_loss"] for r in at]),
                    "plateau": sum(r["plateau"] for r in at),
                    "relevance_in_cell": ms(rel) if rel else None,
                    "relevance_baseline": at[0].get("relevance_baseline"),
                    "swept": sorted({r["lr"] for r in runs if r["projector"] == name
                                     and r["seed"] == seeds[0]})})
    return out


# ---------------------------------------------------------------------------------- reporting
QTYPE_TITLES = {"read": "read all (per digit)", "row": "read one row (per digit)",
                "cell": "cell digit (position token)", "local": "local (row, col words)",
                "count": "count", "relation": "relation (yes/no)", "neighbor": "neighbor digit"}
LOCAL_TYPE = "cell"  # the question whose relevance maps are scored


def _pm(m_s, digits: int = 3) -> str:
    m, s = m_s
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def relevance_reported(summary: dict, chance: dict, margin: float = PLATEAU_MARGIN) -> bool:
    """Relevance shares are reported only where the local question is above chance."""
    acc = summary["accuracy"].get(LOCAL_TYPE)
    return (acc is not None and summary["relevance_in_cell"] is not None
            and acc[0] > chance[LOCAL_TYPE]["majority"] + margin)


def results_table(results: dict, summary: list[dict] | None = None) -> str:
    """Markdown: per projector, test accuracy mean ± std over the seeds at the rate chosen on
    validation (or the rows of ``summary``), then the chance rows."""
    from .dataset import QTYPES
    chance = results["chance"]
    qt = [t for t in QTYPES if t in chance]
    has_rel = LOCAL_TYPE in qt
    hdr = ["projector", "visual tokens",
           "lr (val-selected of)" if summary is None else "lr (fixed; swept)", "seeds",
           *(QTYPE_TITLES[t] for t in qt), "mean", "final train loss", "on plateau"]
    if has_rel:
        hdr.append("relevance in asked digit")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results["summary"] if summary is None else summary:
        tok = str(r["visual_tokens"])
        if r["projector"].startswith("mlp"):
            tok += " (all patches)"
        swept = ", ".join(f"{x:g}" for x in r["swept"])
        row = [r["projector"], tok, f"{r['lr']:g} ({swept})", str(r["n_seeds"]),
               *(_pm(r["accuracy"][t]) for t in qt), _pm(r["overall"]),
               _pm(r["final_loss"]), f"{r['plateau']}/{r['n_seeds']}"]
        if has_rel:
            row.append(_pm(r["relevance_in_cell"]) if relevance_reported(r, chance)
                       else "— (cell at chance)")
        lines.append("| " + " | ".join(row) + " |")
    for key, label in (("uniform", "chance: uniform guess"),
                       ("majority", "chance: majority answer")):
        row = [label, "", "", "", *(f"{chance[t][key]:.3f}" for t in qt),
               f"{sum(chance[t][key] for t in qt) / len(qt):.3f}", "", ""]
        if has_rel:
            base = results.get("relevance_baseline")
            row.append(f"{base:.3f} (uniform map)" if key == "uniform" and base else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Markdown: every run (rate sweep and seeds), validation and test mean accuracy."""
    hdr = ["projector", "lr", "seed", "val mean", "test mean", "final train loss", "plateau",
           "train s"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results["runs"]:
        lines.append("| " + " | ".join([
            r["projector"], f"{r['lr']:g}", str(r["seed"]), f"{r['val_overall']:.3f}",
            f"{r['overall']:.3f}", f"{r['final_loss']:.3f}", "yes" if r["plateau"] else "no",
            f"{r['train_s']:.0f}"]) + " |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> str:
    p = results["profile_settings"]
    table = results_table(results)
    tw = results.get("tower_stats", {})
    if p["tower"] == "pretrained":
        acc = "; ".join(f"seed {k}: per-patch accuracy train {v['patch_acc']['train']:.3f}"
                        + (f", val {v['patch_acc']['val']:.3f}" if "val" in v["patch_acc"]
                           else "") for k, v in tw.items())
        tower = (f"Vision tower pretrained ({p['tower_steps']} steps x {p['tower_batch']}) on "
                 f"the training images by per-patch digit/background classification, then "
                 f"frozen ({acc}).")
    else:
        tower = "Vision tower trained from scratch together with projector and LLM."
    g = p["grid"]
    md = [f"# Digit-grid detail perception (`--profile {results['profile']}`)", "",
          f"{p['n_train']} training images: {g[0]}x{g[1]} handwritten digits (scikit-learn "
          f"`load_digits`) on a {p['pitch']} px pitch with random sub-cell offsets "
          f"({results['image_size'][0]} px, patch grid {results['visual_grid'][0]}x"
          f"{results['visual_grid'][1]}; projector windows 3x3, so no window lines up with a "
          f"digit); questions per image: {', '.join(f'{t} x{k}' for t, k in results['train_repeats'].items())}. "
          f"{tower} Projector + LLM trained {p['steps']} steps x batch {p['batch']}. "
          f"Learning rate chosen per projector on {results['n_val_questions']} validation "
          f"questions (seed {p['seeds'][0]}); test: {results['n_test_questions']} questions on "
          f"{p['n_test']} images of unseen handwriting; mean ± std over seeds "
          f"{list(p['seeds'])} at that rate (std 0 with one seed); exact match of the greedy "
          "answer (read / row: share of digits right, in order).", "",
          table, "",
          "On plateau: runs whose validation accuracy is within "
          f"{PLATEAU_MARGIN} of the majority answer on every question type (they learned the "
          "answer prior, not the images; not evidence about the projector). Relevance in asked "
          "digit: share of the relevance map (models/digits/relevance.py) on the patches covered "
          "by the asked digit, mean over test cell questions; reported only where cell accuracy "
          "is above chance; the uniform-map baseline is the digit's share of the patch area.",
          ""]
    lr0 = p["lrs"][0]
    same = summarize(results["runs"], [s["projector"] for s in results["summary"]], p["seeds"],
                     lr=lr0)
    if len(p["lrs"]) > 1 and same:
        md += [f"## Every projector at the sweep's first rate ({lr0:g})", "",
               "Not selected per projector: the same rate for all, every seed run at it.", "",
               results_table(results, same), ""]
    md += ["## All runs", "", runs_table(results), "",
          f"Wall-clock: {results['wall_clock_s']:.0f} s "
          f"{'for the longest of %d processes run side by side' % results['merged_from'] if results.get('merged_from') else 'in all'} (dataset build "
          f"{results['dataset_s']:.1f} s), {results['cpu_s']:.0f} CPU s (about the wall-clock "
          f"on an unloaded core) on {results['device']}, load average "
          f"{min(results['loadavg']):.1f}-{max(results['loadavg']):.1f} during the run; "
          f"torch {results['torch']}"
          f"{'; PARTIAL (run still going or cut off)' if not results.get('complete') else ''}.",
          "", "Plots: `loss_curves.png`, `accuracy.png`, `relevance.png`.", "",
          f"Command: `{results['command']}`", ""]
    (out / "results.md").write_text("\n".join(md))
    return table


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .dataset import QTYPES
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    colors = {}
    for r in results["runs"]:
        y = np.asarray(r["losses"], float)
        k = max(1, len(y) // 50)
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        first = r["projector"] not in colors
        c = colors.setdefault(r["projector"], f"C{len(colors)}")
        ax.plot(np.arange(len(ys)) + k, ys, color=c, lw=0.8, alpha=0.7,
                ls="--" if r["plateau"] else "-", label=r["projector"] if first else None)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (answer tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"profile {results['profile']}: every run (dashed: on the plateau)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)

    qt = [t for t in QTYPES if t in results["chance"]]
    summ = results["summary"]
    if not summ:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=80)
    w = 0.8 / len(summ)
    x = np.arange(len(qt))
    for i, r in enumerate(summ):
        ax.bar(x + (i - (len(summ) - 1) / 2) * w, [r["accuracy"][t][0] for t in qt], w,
               yerr=[r["accuracy"][t][1] for t in qt], capsize=2,
               label=f"{r['projector']} ({r['visual_tokens']} tok)")
    for j, t in enumerate(qt):
        ax.hlines(results["chance"][t]["majority"], j - 0.45, j + 0.45, colors="k",
                  linestyles="--", lw=1, label="majority-answer chance" if j == 0 else None)
    ax.set_xticks(x, [QTYPE_TITLES[t] for t in qt], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test exact match (mean ± std)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def _write(results: dict, out: Path, projectors) -> str:
    results["summary"] = summarize(results["runs"], projectors, results["profile_settings"]["seeds"])
    table = write_report(results, out)
    plot(results, out)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    return table


def _save(results: dict, out: Path, projectors, t_start: float) -> str:
    results["wall_clock_s"] = time.time() - t_start
    # CPU seconds of this process (one torch thread on a CPU): about the wall-clock it would take
    # on an unloaded core, whatever the load while it ran
    results["cpu_s"] = time.process_time() - results.get("_cpu0", 0.0)
    results["loadavg"] = results.get("loadavg", []) + [round(os.getloadavg()[0], 2)]
    return _write(results, out, projectors)


def protocol_complete(runs: list[dict], projectors, lrs, seeds) -> bool:
    """Every rate ran with the first seed, and every seed at each projector's selected rate."""
    have = {(r["projector"], r["lr"], r["seed"]) for r in runs}
    for name in projectors:
        if any((name, lr, seeds[0]) not in have for lr in lrs):
            return False
        lr = select_lr(runs, name, seeds[0])
        if any((name, lr, s) not in have for s in seeds):
            return False
    return True


def merge_results(parts, out, projectors=PROJECTORS) -> dict:
    """Combine result folders of one profile run as separate processes (e.g. the seeds of the
    first rate in one, the rest of the rate sweep in another), recompute the summary (rates still
    chosen on validation) and write the report to ``out``. Wall-clock: the longest part; CPU s:
    the sum; complete: :func:`protocol_complete`. The first part's seeds come first (its first seed is the sweep's)."""
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in parts]
    base = parts[0]
    for q in parts[1:]:
        if q["profile"] != base["profile"] or q["chance"] != base["chance"]:
            raise ValueError("merge_results: the parts are not of the same profile and data")
    runs, seen = [], set()
    for q in parts:
        for r in q["runs"]:
            if (r["projector"], r["lr"], r["seed"]) not in seen:
                seen.add((r["projector"], r["lr"], r["seed"]))
                runs.append(r)
    merged = {**base, "runs": runs,
              "wall_clock_s": max(q["wall_clock_s"] for q in parts),
              "cpu_s": sum(q["cpu_s"] for q in parts),
              "loadavg": [x for q in parts for x in q.get("loadavg", [])],
              "tower_stats": {k: v for q in parts for k, v in q["tower_stats"].items()},
              "command": " ; ".join(q["command"] for q in parts)}
    p = dict(base["profile_settings"])
    p["lrs"] = list(dict.fromkeys(x for q in parts for x in q["profile_settings"]["lrs"]))
    p["seeds"] = list(dict.fromkeys(x for q in parts for x in q["profile_settings"]["seeds"]))
    merged["profile_settings"] = p
    merged["merged_from"] = len(parts)
    merged["complete"] = protocol_complete(runs, projectors, p["lrs"], p["seeds"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(merged, out, projectors)
    return merged


def run_study(profile: str = "cpu", out="runs/digits_cpu", *, projectors=PROJECTORS,
              overrides: dict | None = None, keep_runs: bool = False,
              command: str | None = None) -> dict:
    """Build the data, pretrain the tower(s), run the rate sweep and the seeds of every
    projector, write the report after every run. Returns the results dict (also
    ``out/results.json``)."""
    from .dataset import QTYPES, build_digit_dataset
    from .relevance import relevance_study, save_relevance_figure
    from .tower import pretrain_tower
    t_start, cpu0 = time.time(), time.process_time()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # "Writing model shards" bars of each checkpoint
    except ImportError:
        pass
    name = resolve_profile(profile)
    p = {**PROFILES[name], **(overrides or {})}
    if p["tower"] not in ("pretrained", "scratch"):
        raise ValueError(f"tower must be 'pretrained' or 'scratch', got {p['tower']!r}")
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
    qtypes = tuple(p.get("qtypes", QTYPES))
    try:
        t0 = time.time()
        data = build_digit_dataset(work / "data", n_train=p["n_train"], n_val=p["n_val"],
                                   n_test=p["n_test"], grid=p["grid"], pitch=p["pitch"],
                                   upsample=p["upsample"], seed=0, qtypes=qtypes,
                                   train_repeats=p.get("train_repeats"))
        t_data = time.time() - t0
        evals = {}
        for k in ("val", "test"):
            with open(data[k]) as f:
                evals[k] = json.load(f)
        comp = components(p, data["words"], data["image_size"])
        side = data["image_size"][0] // p["patch"]
        print(f"profile {name}: {p['n_train']} train images, {len(evals['val'])} val / "
              f"{len(evals['test'])} test questions, image {data['image_size'][0]} px, patch "
              f"grid {side}x{side}, dataset built in {t_data:.1f}s", flush=True)
        reps = {t: (p.get("train_repeats") or {}).get(t, 1) for t in qtypes}
        results = {"profile": name, "profile_settings": p, "chance": data["chance"],
                   "chance_val": data["chance_val"], "train_repeats": reps,
                   "grid": list(p["grid"]), "image_size": list(data["image_size"]),
                   "visual_grid": [side, side], "n_test_questions": len(evals["test"]),
                   "n_val_questions": len(evals["val"]), "dataset_s": t_data,
                   "runs": [], "summary": [], "tower_stats": {}, "complete": False,
                   "_cpu0": cpu0,
                   "device": (torch.cuda.get_device_name() if cuda else
                              f"CPU ({torch.get_num_threads()} threads, "
                              f"{platform.processor() or platform.machine()})"),
                   "torch": torch.__version__,
                   "command": command or f"python -m models.digits.run --profile {profile} "
                                         f"--out {out}"}
        towers = {}

        def tower_for(seed):
            if p["tower"] == "scratch":
                return None
            if seed not in towers:
                tw, st = pretrain_tower(comp["vision_tower"], comp["image_processor"], data,
                                        steps=p["tower_steps"], batch=p["tower_batch"],
                                        lr=p["tower_lr"], seed=seed, patch=p["patch"],
                                        upsample=p["upsample"])
                st["losses"] = st["losses"][::max(1, len(st["losses"]) // 100)]
                print(f"tower seed {seed}: per-patch accuracy {st['patch_acc']} "
                      f"({st['seconds']:.1f}s)", flush=True)
                towers[seed] = tw
                results["tower_stats"][str(seed)] = st
            return towers[seed]

        rel_recs = [r for r in evals["test"] if r["qtype"] == LOCAL_TYPE]
        n_rel = max(p["n_relevance_score"], p["n_relevance"])
        rel_maps = {}

        def one(proj, lr, seed):
            r, model = run_projector(proj, p, data, comp, tower_for(seed), work, impl, evals,
                                     lr=lr, seed=seed)
            if rel_recs:
                rel = relevance_study(model, rel_recs[:n_rel], data["image_folder"])
                r.update(relevance_in_cell=rel["in_cell"], relevance_method=rel["method"],
                         relevance_baseline=rel["baseline"])
                results["relevance_baseline"] = rel["baseline"]
                rel_maps[(proj, lr, seed)] = rel["maps"][:p["n_relevance"]]
            results["runs"].append(r)
            _save(results, out, projectors, t_start)

        seeds, lrs = list(p["seeds"]), list(p["lrs"])
        # execution order, so that a cut-off run still has every projector: the first rate with
        # every seed, then the rest of the sweep (first seed), then the other seeds at any rate
        # that validation picked instead of the first
        done = set()
        for lr, seed in [(lrs[0], s) for s in seeds] + [(lr, seeds[0]) for lr in lrs[1:]]:
            for proj in projectors:
                one(proj, lr, seed)
                done.add((proj, lr, seed))
        for proj in projectors:
            lr = select_lr(results["runs"], proj, seeds[0])
            for seed in seeds[1:]:
                if (proj, lr, seed) not in done:
                    one(proj, lr, seed)
        if rel_recs:
            best = {s["projector"]: rel_maps[(s["projector"], s["lr"], seeds[0])]
                    for s in results["summary"]}
            save_relevance_figure(out / "relevance.png", rel_recs[:p["n_relevance"]],
                                  data["image_folder"], best)
        results["complete"] = True
        table = _save(results, out, projectors, t_start)
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
    ap.add_argument("--lrs", default=None, help="comma-separated learning rates to sweep")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (first: the sweep's)")
    ap.add_argument("--batch", type=int, default=None, help="override the global batch")
    ap.add_argument("--tower", default=None, choices=["pretrained", "scratch"],
                    help="frozen pretrained tower (default) or trained from scratch")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result folders to combine into --out (no training)")
    ap.add_argument("--keep_runs", action="store_true",
                    help="keep the data and checkpoints under <out>/digits_*")
    a = ap.parse_args(argv)
    name = resolve_profile(a.profile)
    out = a.out or f"runs/digits_{name}"
    if a.merge:
        merge_results([d for d in a.merge.split(",") if d], out,
                      [s for s in a.projectors.split(",") if s])
        print((Path(out) / "results.md").read_text())
        return
    over = {k: v for k, v in (("steps", a.steps), ("n_train", a.n_train), ("batch", a.batch),
                              ("tower", a.tower)) if v is not None}
    if a.lrs:
        over["lrs"] = tuple(float(x) for x in a.lrs.split(","))
    if a.seeds:
        over["seeds"] = tuple(int(x) for x in a.seeds.split(","))
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    run_study(a.profile, out, projectors=[s for s in a.projectors.split(",") if s],
              overrides=over, keep_runs=a.keep_runs,
              command=f"python -m models.digits.run {argv_s}".strip())


if __name__ == "__main__":
    main()
