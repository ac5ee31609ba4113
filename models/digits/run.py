"""The digit-grid detail-perception study: tiny MLLMs on a frozen pretrained tower, one per
projector configuration, compared at matched visual-token counts, with per-configuration
learning-rate grids on validation and seeds.

    python -m models.digits.run --profile cpu          # `make run`: seed 0, chosen rates (minutes)
    python -m models.digits.run --profile cpu --check benchmarks/results/digits_cpu_seed0
    python -m models.digits.run --profile cpu-pilot    # the step-budget pilot (constant rate)
    python -m models.digits.run --profile cpu-study --configs pargo-9,deco-9 --out DIR1  # ...
    python -m models.digits.run --merge DIR1,DIR2,... --out benchmarks/results/digits_cpu_study
    python -m models.digits.run --profile auto ...     # gpu if CUDA, else cpu

Data (:mod:`models.digits.dataset`): 4x4 grids of scikit-learn handwritten digits on a 9 px pitch
with random sub-cell offsets (36 px images). CPU profiles: 3 px patches (12x12 patch grid), so
the projectors' windows (3x3 = 12 px and 6x6 = 6 px) never line up with the 9 px digit cells.

Configurations (``--configs``; ``<projector>-<visual tokens>``): ``pargo-9`` (3x3 partial windows,
no global query: the only 9-token ParGo whose windows do not line up with the digits; 2x4 or 4x2
windows are 9 px wide, one digit column or row each), ``qformer-9``, ``deco-9`` (3x3 pooling);
``pargo-36`` (5x7 partial windows + 1 global query), ``qformer-36``, ``deco-36`` (6x6 pooling);
``mlp-144`` (every patch, the upper reference).

Protocols (``--protocols``):

* ``aligned`` (the papers' recipe, the default): the LM is first trained on the text side of the
  task (the same conversations without the image, ``lm_steps``; one LM per seed, shared by every
  configuration); stage 1 trains the projector alone against that frozen LM (``s1_steps``);
  stage 2 trains projector + LM (``steps``). Both stages at the run's rate, warmup ratio 0.03,
  cosine, weight decay 0 (LLaVA's settings).
* ``joint`` (the earlier protocol): projector + a fresh LM trained together from the start, for
  ``s1_steps + steps`` steps (the same number of image steps).

Rates: per (configuration, protocol), the profile's grid is run with the first seed; the rate
with the best mean VALIDATION accuracy is kept; while it lies on the edge of what ran, the grid is
widened by a factor ``lr_widen`` beyond that edge (``max_widen`` times at most); then the other
seeds run at the kept rate. Test accuracy is reported as mean +- std over the seeds at that rate.
Validation accuracy is also measured every ``eval_every`` stage-2 steps (``val_curve`` in the
JSON, ``val_curves.png``). The step budget ``steps`` comes from the ``cpu-pilot`` profile (rule in
the README's study section). A run whose validation accuracy stays within 0.05 of the majority
answer on every question type is flagged as on the answer-prior plateau.

Reproducibility: everything is seeded (data, tower, LM, projector, data order); on one machine
and software stack two runs give bit-identical losses and answers (tests/test_digits.py runs a
tiny profile twice). Other CPUs (other MKL / oneDNN / ATen kernel paths) round differently, and
training amplifies that: ``--check DIR`` reruns a profile and compares every run with
``DIR/results.json`` exactly, and names the platform differences when they do not match.

Writes to ``--out`` (after every run, so a cut-off run still leaves data): ``results.md``,
``results.json`` (every run: loss and validation curves, answers), ``loss_curves.png``,
``val_curves.png``, ``accuracy.png`` and ``relevance.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECTORS = ("pargo", "qformer", "deco", "mlp2x_gelu")
SHORT = {"pargo": "pargo", "qformer": "qformer", "deco": "deco", "mlp": "mlp2x_gelu"}
PROTOCOLS = ("aligned", "joint")
PLATEAU_MARGIN = 0.05

_CONFIGS_9 = ("pargo-9", "qformer-9", "deco-9")
_CONFIGS_36 = ("pargo-36", "qformer-36", "deco-36")
# the kept rate of every (configuration, protocol): the cpu-study's choice on validation
# (benchmarks/results/digits_cpu_study); `make run` runs seed 0 at these
_CHOSEN = {"aligned": {"pargo-9": 2e-3, "qformer-9": 2e-3, "deco-9": 2e-3, "pargo-36": 1e-3,
                       "qformer-36": 1e-3, "deco-36": 2e-3, "mlp-144": 1e-3},
           "joint": {"pargo-9": 1e-3, "deco-9": 2e-3}}
_GRID = (5e-4, 1e-3, 2e-3)

# n_train: training images (one conversation each, `train_repeats` questions per type); steps x
# batch: stage-2 conversations seen; tower_*: the tower's pretraining; lm_*: the LM's text
# pretraining (aligned protocol); s1_steps: stage 1 (aligned) / extra joint steps
_STUDY = dict(
    n_train=3000, n_val=100, n_test=200, grid=(4, 4), pitch=9, upsample=1, patch=3,
    vision_hidden=64, vision_layers=2, vision_heads=4, llm_hidden=64, llm_layers=2, llm_heads=4,
    proj_hidden=64, proj_layers=2, proj_heads=4, pargo_layouts={9: ((3, 3), 0), 36: ((5, 7), 1)},
    configs=(*_CONFIGS_9, *_CONFIGS_36, "mlp-144"),
    protocols={"aligned": (*_CONFIGS_9, *_CONFIGS_36, "mlp-144"),
               "joint": ("pargo-9", "deco-9")},
    lrs={pr: {c: _GRID for c in cs} for pr, cs in _CHOSEN.items()}, lr_widen=2.0, max_widen=3,
    seeds=(0, 1, 2), steps=2400, s1_steps=400, lm_steps=400, lm_lr=2e-3, batch=16,
    lr_scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0, eval_every=200,
    qtypes=("read", "row", "cell"), train_repeats={"cell": 3}, proj_init="torch",
    tower="pretrained", tower_steps=1600, tower_batch=32, tower_lr=3e-3, eval_batch=300,
    log_every=100, n_relevance=4, n_relevance_score=40, n_dependence=64, cpu_threads=1)
PROFILES = {
    # `make run`: a short look (a third of the study's stage-2 budget) at the 9-token
    # configurations + the MLP, seed 0, at the study's chosen rates; same data, tower and LM
    "cpu": {**_STUDY, "configs": (*_CONFIGS_9, "mlp-144"), "steps": 800, "s1_steps": 200,
            "protocols": {"aligned": (*_CONFIGS_9, "mlp-144")},
            "lrs": {"aligned": {c: (_CHOSEN["aligned"][c],) for c in (*_CONFIGS_9, "mlp-144")}},
            "seeds": (0,), "max_widen": 0},
    "cpu-study": _STUDY,
    # the step-budget pilot: seed 0, one rate, a long constant-rate stage 2
    "cpu-pilot": {**_STUDY, "protocols": {"aligned": _STUDY["configs"]},
                  "lrs": {"aligned": {c: (1e-3,) for c in _STUDY["configs"]}}, "seeds": (0,),
                  "max_widen": 0, "steps": 2400, "lr_scheduler": "constant_with_warmup",
                  "eval_every": 100},
    # not run here (no GPU on the machine this was written on): bigger data and models, every
    # question type
    "gpu": {**_STUDY, "n_train": 20000, "n_val": 300, "n_test": 500, "upsample": 2, "patch": 6,
            "vision_hidden": 192, "vision_layers": 4, "vision_heads": 6, "llm_hidden": 256,
            "llm_layers": 4, "llm_heads": 8, "proj_hidden": 192, "proj_heads": 6, "batch": 64,
            "steps": 3000, "s1_steps": 1000, "lm_steps": 1000, "lm_lr": 1e-3,
            "qtypes": ("read", "row", "cell", "local", "count", "relation", "neighbor"),
            "train_repeats": {"cell": 2}, "tower_steps": 3000, "tower_batch": 64,
            "tower_lr": 1e-3, "eval_batch": 500, "eval_every": 250, "log_every": 250,
            "n_relevance_score": 200, "cpu_threads": None},
    # a few steps of everything, for tests (6x6 patch grid)
    "tiny": dict(n_train=32, n_val=6, n_test=8, grid=(4, 4), pitch=9, upsample=1, patch=6,
                 vision_hidden=32, vision_layers=1, vision_heads=2, llm_hidden=32, llm_layers=1,
                 llm_heads=2, proj_hidden=32, proj_layers=1, proj_heads=2,
                 pargo_layouts={9: ((3, 3), 0), 10: ((3, 3), 1)},
                 configs=("pargo-9", "qformer-9", "deco-9", "mlp-36"),
                 protocols={"aligned": ("pargo-9", "qformer-9", "deco-9", "mlp-36")},
                 lrs={"aligned": {c: (1e-3,) for c in ("pargo-9", "qformer-9", "deco-9",
                                                         "mlp-36")}},
                 lr_widen=2.0, max_widen=0, seeds=(0,), steps=3, s1_steps=2, lm_steps=2,
                 lm_lr=1e-3, batch=8, lr_scheduler="cosine", warmup_ratio=0.0,
                 weight_decay=0.0, eval_every=2, qtypes=("read", "row", "cell"),
                 train_repeats={}, proj_init="torch", tower="pretrained", tower_steps=3,
                 tower_batch=8, tower_lr=1e-3, eval_batch=64, log_every=1, n_relevance=2,
                 n_relevance_score=4, n_dependence=4, cpu_threads=1),
}


def resolve_profile(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)} or 'auto', got {name!r}")
    return name


def parse_config(label: str) -> tuple[str, int]:
    """``"pargo-9"`` -> ``("pargo", 9)`` (registry name, visual tokens)."""
    m = re.fullmatch(r"([a-z]+)-(\d+)", str(label))
    if m is None or m[1] not in SHORT:
        raise ValueError(f"configuration must be <{'|'.join(SHORT)}>-<visual tokens>, "
                         f"got {label!r}")
    return SHORT[m[1]], int(m[2])


def visual_grid(p: dict) -> tuple[int, int]:
    """The tower's patch grid of profile ``p``."""
    side = p["pitch"] * p["upsample"]
    rows, cols = (g * side for g in p["grid"])
    if rows % p["patch"] or cols % p["patch"]:
        raise ValueError(f"patch ({p['patch']} px) must divide the image ({rows}x{cols} px)")
    return rows // p["patch"], cols // p["patch"]


def projector_kwargs(label: str, p: dict, impl: str) -> tuple[str, dict]:
    """``(registry name, constructor arguments)`` of configuration ``label``: ParGo per the
    profile's ``pargo_layouts`` (tokens -> (partial grid, global queries)), the Q-Former with as
    many queries as tokens, DeCo pooled to a square grid of that many cells, the MLP every patch
    (its token count must be the patch count)."""
    name, tokens = parse_config(label)
    q = dict(n_layers=p["proj_layers"], hidden=p["proj_hidden"], heads=p["proj_heads"],
             intermediate=2 * p["proj_hidden"], impl=impl)
    gh, gw = visual_grid(p)
    if name == "pargo":
        if tokens not in p["pargo_layouts"]:
            raise ValueError(f"{label}: no ParGo layout for {tokens} tokens in the profile's "
                             f"pargo_layouts {sorted(p['pargo_layouts'])}")
        (pr, pc), n_global = p["pargo_layouts"][tokens]
        if pr * pc + n_global != tokens:
            raise ValueError(f"{label}: layout {pr}x{pc} + {n_global} is not {tokens} tokens")
        return name, dict(n_partial=pr * pc, n_global=n_global, partial_grid=[pr, pc], **q)
    if name == "qformer":
        return name, dict(n_query=tokens, **q)
    if name == "deco":
        side = math.isqrt(tokens)
        if side * side != tokens or gh % side or gw % side:
            raise ValueError(f"{label}: DeCo needs a square token grid dividing the "
                             f"{gh}x{gw} patch grid")
        return name, dict(query_grid=[side, side], impl=impl)
    if tokens != gh * gw:
        raise ValueError(f"{label}: the MLP gives one token per patch ({gh * gw})")
    return name, {}


def components(p: dict, words, image_size) -> dict:
    """Fresh tiny configs (tower, LM), the vocabulary and the image processor (plain
    transformers objects; the tokenizer is built in :func:`build_mllm`)."""
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


# ------------------------------------------------------- the study's calls into the MLLM trainer
def build_mllm(tower, comp: dict, projector: str, projector_kwargs: dict, *, seed: int,
               tune_vision_tower: bool = False):
    """The MLLM: ``tower`` module + a fresh Llama + ``projector``, initialised from ``seed``."""
    import transformers as tf

    from ..mllm import MLLM, word_level_tokenizer
    tok = word_level_tokenizer(comp["words"])
    lc = tf.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        **comp["llm"])
    torch.manual_seed(seed)
    return MLLM.build(tower, lc, projector, tokenizer=tok,
                      image_processor=comp["image_processor"],
                      projector_kwargs=projector_kwargs, vision_feature_layer=-1,
                      freeze_vision_tower=not tune_vision_tower)


def train_stage(model, *, stage: int, data_path, image_folder, output_dir, steps: int, batch: int,
                lr: float, seed: int, warmup_ratio: float, weight_decay: float,
                lr_scheduler: str = "cosine", tune_vision_tower: bool = False,
                on_step=None) -> dict:
    """One trainer run on ``model``: stage 1 (projector only) or stage 2 (projector + LLM; the
    tower too when ``tune_vision_tower``). Returns ``{"losses", "loss", "samples_per_s"}``."""
    from ..mllm.train import train
    cfg = dict(output_dir=str(output_dir), data_path=str(data_path),
               image_folder=str(image_folder), stage=stage,
               unfreeze_mm_vision_tower=tune_vision_tower,
               projector=model.projector.config["name"], mm_vision_select_layer=-1,
               max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
               warmup_ratio=warmup_ratio, weight_decay=weight_decay,
               lr_scheduler_type=lr_scheduler, model_max_length=512, disable_tqdm=True,
               seed=seed, version="vicuna_v1", save_strategy="no",
               bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    res = train(cfg, model=model, on_step=on_step)
    return {"losses": res["losses"], "loss": res["loss"], "samples_per_s": res["samples_per_s"]}


def train_mllm(tower, comp: dict, projector: str, projector_kwargs: dict, *, data_path,
               image_folder, output_dir, steps: int, batch: int, lr: float, seed: int,
               warmup_ratio: float, weight_decay: float, tune_vision_tower: bool,
               on_step=None, init=None):
    """Build the MLLM (:func:`build_mllm`) and train it in one stage-2 run (the ``joint``
    protocol); ``init(model)`` runs before training. Returns ``(model, train_stage result)``."""
    model = build_mllm(tower, comp, projector, projector_kwargs, seed=seed,
                       tune_vision_tower=tune_vision_tower)
    if init is not None:
        init(model)
    res = train_stage(model, stage=2, data_path=data_path, image_folder=image_folder,
                      output_dir=output_dir, steps=steps, batch=batch, lr=lr, seed=seed,
                      warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                      tune_vision_tower=tune_vision_tower, on_step=on_step)
    return model, res


def text_only(records: list[dict]) -> list[dict]:
    """The text side of training conversations: no image, no ``<image>`` placeholder."""
    out = []
    for r in records:
        conv = [{**t, "value": t["value"].replace("<image>\n", "").replace("\n<image>", "")}
                for t in r["conversations"]]
        out.append({"id": f"{r['id']}_text", "conversations": conv})
    return out


def pretrain_lm(tower, comp: dict, data: dict, work: Path, p: dict, seed: int) -> tuple[dict, dict]:
    """The LM of the ``aligned`` protocol: a fresh Llama (``seed``) trained ``lm_steps`` on the
    text side of the training conversations. Returns ``(llm state_dict, stats)``."""
    path = work / "train_text.json"
    if not path.exists():
        with open(data["train"]) as f:
            path.write_text(json.dumps(text_only(json.load(f))))
    model = build_mllm(tower, comp, "mlp2x_gelu", {}, seed=seed)
    t0, c0 = time.time(), time.process_time()
    res = train_stage(model, stage=2, data_path=path, image_folder=data["image_folder"],
                      output_dir=work / f"lm_{seed}", steps=p["lm_steps"], batch=p["batch"],
                      lr=p["lm_lr"], seed=seed, warmup_ratio=p["warmup_ratio"],
                      weight_decay=p["weight_decay"], lr_scheduler="cosine",
                      on_step=_progress(f"lm s{seed}", p["lm_steps"], p["log_every"]))
    state = {k: v.detach().clone() for k, v in model.llm.state_dict().items()}
    return state, {"losses": res["losses"], "final_loss": res["loss"],
                   "seconds": time.time() - t0, "cpu_s": time.process_time() - c0}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, records: list[dict], image_folder, batch_size: int,
             max_new_tokens: int = 3) -> dict:
    """Exact match of the greedy answers: ``{"by_type": {qtype: acc}, "overall", "answers"}``.
    Leaves every module's train / eval mode as it found it."""
    from .dataset import batches, score
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    preds = []
    try:
        for _, images, qs in batches(records, image_folder, batch_size):
            preds += model.chat(images, qs, max_new_tokens=max_new_tokens, template="vicuna_v1")
    finally:
        for m, t in modes:
            m.training = t
    by_type: dict[str, list[float]] = {}
    for r, a in zip(records, preds):
        by_type.setdefault(r["qtype"], []).append(score(r["qtype"], a, r["answer"]))
    acc = {t: sum(v) / len(v) for t, v in by_type.items()}
    return {"by_type": acc, "overall": sum(acc.values()) / len(acc), "answers": preds}


@torch.no_grad()
def image_dependence(model, pixel_values) -> float:
    """The share of the projector output's variance that changes from image to image:
    ``sum (y - mean over images)^2 / sum (y - mean over images and tokens)^2`` (per channel),
    ``y = encode_images(pixel_values)`` ``[N, tokens, width]``. 0: every image gives the same
    tokens (a blind projector); the MLP of an informative tower is near 1."""
    y = model.encode_images(pixel_values.to(next(model.projector.parameters()).device)).float()
    per_token = y.mean(0, keepdim=True)
    overall = y.mean((0, 1), keepdim=True)
    return float(((y - per_token) ** 2).sum() / ((y - overall) ** 2).sum().clamp(min=1e-30))


def on_plateau(val_acc: dict, chance: dict, margin: float = PLATEAU_MARGIN) -> bool:
    """True when no question type's validation accuracy beats its majority answer by ``margin``."""
    return all(val_acc[t] <= chance[t]["majority"] + margin for t in val_acc)


def _progress(name: str, total: int, every: int):
    def cb(rec):
        s = rec["step"]
        if s % every == 0 or s == total or s == 1:
            print(f"[{name:>22}] step {s:5d}/{total} loss {rec['loss']:.4f} "
                  f"lr {rec['lr']:.2e} {rec['time']:7.1f}s", flush=True)
    return cb


def _torch_init(model) -> None:
    # PyTorch's default (fan-in) init for every Linear of the projector instead of BERT's
    # N(0, 0.02): next to a from-scratch LLM the query projectors' visual signal otherwise
    # starts so small that the LLM settles on the answer prior.
    for m in model.projector.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()


def run_key(r: dict) -> tuple:
    return (r["config"], r["protocol"], r["lr"], r["seed"])


def run_one(ctx: dict, label: str, protocol: str, lr: float, seed: int) -> tuple[dict, object]:
    """Train one (configuration, protocol, rate, seed); score it on validation (every
    ``eval_every`` stage-2 steps and at the end) and on the test set."""
    p, data, comp, evals, work = ctx["p"], ctx["data"], ctx["comp"], ctx["evals"], ctx["work"]
    name, kw = projector_kwargs(label, p, ctx["impl"])
    tag = f"{label} {protocol} lr{lr:g} s{seed}"
    n_cells = p["grid"][0] * p["grid"][1]
    scratch = p["tower"] == "scratch"
    c0, t0 = time.process_time(), time.time()
    if scratch:
        import transformers as tf
        torch.manual_seed(seed)
        tower = tf.CLIPVisionModel(comp["vision_tower"])
    else:
        tower = copy.deepcopy(ctx["tower_for"](seed))
    model = build_mllm(tower, comp, name, kw, seed=seed, tune_vision_tower=scratch)
    if p.get("proj_init") == "torch":
        _torch_init(model)
    dep_pix = ctx["dependence_pixels"]
    dependence = {"init": image_dependence(model, dep_pix)}
    common = dict(data_path=data["train"], image_folder=data["image_folder"], batch=p["batch"],
                  lr=lr, seed=seed, warmup_ratio=p["warmup_ratio"],
                  weight_decay=p["weight_decay"], tune_vision_tower=scratch)
    losses1, s2_steps = [], p["steps"]
    if protocol == "aligned":
        model.llm.load_state_dict(ctx["lm_for"](seed))
        res1 = train_stage(model, stage=1, output_dir=work / f"{label}_{protocol}_{lr:g}_{seed}_1",
                           steps=p["s1_steps"], lr_scheduler="cosine",
                           on_step=_progress(tag + " s1", p["s1_steps"], p["log_every"]),
                           **common)
        losses1 = res1["losses"]
        dependence["stage1"] = image_dependence(model, dep_pix)
    elif protocol == "joint":
        s2_steps = p["s1_steps"] + p["steps"]
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    curve, t_eval = [], [0.0]
    prog = _progress(tag, s2_steps, p["log_every"])

    def on_step(rec):
        prog(rec)
        s = rec["step"]
        if p["eval_every"] and (s % p["eval_every"] == 0 or s == s2_steps):
            te = time.time()
            ev = evaluate(model, evals["val"], data["image_folder"], p["eval_batch"],
                          n_cells + 2)
            curve.append([s, ev["overall"], ev["by_type"]])
            t_eval[0] += time.time() - te
    res = train_stage(model, stage=2, output_dir=work / f"{label}_{protocol}_{lr:g}_{seed}",
                      steps=s2_steps, lr_scheduler=p["lr_scheduler"], on_step=on_step,
                      **common)
    dependence["final"] = image_dependence(model, dep_pix)
    t_train = time.time() - t0 - t_eval[0]
    te = time.time()
    ev = {"test": evaluate(model, evals["test"], data["image_folder"], p["eval_batch"],
                           n_cells + 2)}
    if curve and curve[-1][0] == s2_steps:
        val = {"by_type": curve[-1][2], "overall": curve[-1][1]}
    else:
        val = evaluate(model, evals["val"], data["image_folder"], p["eval_batch"], n_cells + 2)
    t_eval[0] += time.time() - te
    print(f"[{tag:>22}] val {val['overall']:.3f} test {ev['test']['overall']:.3f} "
          + " ".join(f"{k} {v:.3f}" for k, v in ev["test"]["by_type"].items())
          + f" (train {t_train:.1f}s, eval {t_eval[0]:.1f}s)", flush=True)
    n_params = {k: sum(x.numel() for x in getattr(model, k).parameters())
                for k in ("vision_tower", "projector", "llm")}
    out = {"config": label, "projector": name, "protocol": protocol, "lr": lr, "seed": seed,
           "visual_tokens": model.num_visual_tokens, "projector_kwargs": kw, "params": n_params,
           "val": val["by_type"], "val_overall": val["overall"], "val_curve": curve,
           "accuracy": ev["test"]["by_type"], "overall": ev["test"]["overall"],
           "plateau": on_plateau(val["by_type"], data["chance_val"]),
           "image_dependence": dependence, "losses_stage1": losses1, "losses": res["losses"],
           "final_loss": res["loss"], "train_s": t_train, "eval_s": t_eval[0],
           "cpu_s": time.process_time() - c0, "answers": ev["test"]["answers"]}
    return out, model


# ------------------------------------------------------------------------- rates and summary
def select_lr(runs: list[dict], config: str, seed: int, protocol: str = "aligned") -> float:
    """The rate whose ``seed`` run of ``config`` / ``protocol`` has the best mean VALIDATION
    accuracy (ties: the smaller rate). Test scores play no part."""
    cand = [r for r in runs if r["config"] == config and r["protocol"] == protocol
            and r["seed"] == seed]
    if not cand:
        raise ValueError(f"no runs of {config!r} ({protocol}) with seed {seed}")
    return min(cand, key=lambda r: (-r["val_overall"], r["lr"]))["lr"]


def _round_rate(x: float) -> float:
    return float(f"{x:.3g}")


def rates_to_run(runs: list[dict], config: str, protocol: str, grid, seed: int,
                 widen: float, max_widen: int) -> list[float]:
    """The seed-``seed`` rates of ``config`` / ``protocol`` still to run: the grid's missing
    ones; once they ran, one rate beyond the edge the best (validation) rate lies on, while
    fewer than ``max_widen`` rates were added beyond the grid; else ``[]``."""
    ran = sorted({r["lr"] for r in runs if r["config"] == config and r["protocol"] == protocol
                  and r["seed"] == seed})
    missing = [lr for lr in grid if lr not in ran]
    if missing:
        return missing
    if max_widen <= 0 or len(grid) < 2:
        return []
    if len([lr for lr in ran if lr not in grid]) >= max_widen:
        return []
    best = select_lr(runs, config, seed, protocol)
    if best == ran[0]:
        return [_round_rate(best / widen)]
    if best == ran[-1]:
        return [_round_rate(best * widen)]
    return []


def summarize(runs: list[dict], seeds, protocol: str = "aligned", lr: float | None = None,
              configs=None) -> list[dict]:
    """Per configuration of ``protocol``: the rate selected on validation (or the given ``lr``)
    and the test accuracy mean / std over the seeds run at it (``n_seeds`` may be short of
    ``len(seeds)`` in a cut-off run); ``inside``: the rate lies strictly inside the swept ones."""
    out = []
    fixed = lr
    runs = [r for r in runs if r["protocol"] == protocol]
    order = configs or list(dict.fromkeys(r["config"] for r in runs))
    for label in order:
        if not any(r["config"] == label and r["seed"] == seeds[0] for r in runs):
            continue
        lr = select_lr(runs, label, seeds[0], protocol) if fixed is None else fixed
        at = [r for r in runs if r["config"] == label and r["lr"] == lr]
        if not at:
            continue
        types = list(at[0]["accuracy"])

        def ms(vals):
            return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rel = [r["relevance_in_cell"] for r in at if r.get("relevance_in_cell") is not None]
        swept = sorted({r["lr"] for r in runs if r["config"] == label and r["seed"] == seeds[0]})
        dep = {k: ms([r["image_dependence"][k] for r in at])
               for k in at[0].get("image_dependence", {})}
        out.append({"config": label, "projector": at[0]["projector"], "protocol": protocol,
                    "lr": lr, "n_seeds": len(at), "seeds": [r["seed"] for r in at],
                    "visual_tokens": at[0]["visual_tokens"],
                    "accuracy": {t: ms([r["accuracy"][t] for r in at]) for t in types},
                    "overall": ms([r["overall"] for r in at]),
                    "val_overall": ms([r["val_overall"] for r in at]),
                    "final_loss": ms([r["final_loss"] for r in at]),
                    "plateau": sum(r["plateau"] for r in at),
                    "relevance_in_cell": ms(rel) if rel else None,
                    "relevance_baseline": at[0].get("relevance_baseline"),
                    "image_dependence": dep, "swept": swept,
                    "inside": len(swept) >= 3 and swept[0] < lr < swept[-1]})
    return out


def knee_check(runs: list[dict], summary: list[dict], seed: int, tail: float = 0.25) -> dict:
    """Per summarised configuration: the seed-``seed`` run at the kept rate, its validation mean
    at the end of stage 2 minus the best of the curve before the last ``tail`` of the steps
    (small: the budget is past the knee)."""
    out = {}
    for s in summary:
        r = next((x for x in runs if x["config"] == s["config"] and x["protocol"] == s["protocol"]
                  and x["lr"] == s["lr"] and x["seed"] == seed), None)
        if r is None or not r.get("val_curve"):
            continue
        last = r["val_curve"][-1][0]
        before = [v for st, v, _ in r["val_curve"] if st <= (1 - tail) * last]
        if before:
            out[s["config"]] = r["val_curve"][-1][1] - max(before)
    return out


def knee_step(curve, tol: float = 0.02, window: int = 3) -> int | None:
    """The first step of a validation curve ``[[step, mean, ...], ...]`` at which its moving
    average over ``window`` evaluations comes within ``tol`` of that average's maximum (the
    budget rule of the ``cpu-pilot`` profile; None for an empty curve)."""
    if not curve:
        return None
    steps = [c[0] for c in curve]
    vals = [c[1] for c in curve]
    sm = [statistics.fmean(vals[max(0, i - window + 1):i + 1]) for i in range(len(vals))]
    top = max(sm)
    return next(st for st, v in zip(steps, sm) if v >= top - tol)


def budget_from_pilot(runs: list[dict], tol: float = 0.02, window: int = 3,
                      multiple: int = 200) -> tuple[int | None, dict]:
    """The step budget of the study: the latest :func:`knee_step` over the pilot's runs, rounded
    up to a multiple of ``multiple``. Returns ``(budget, {config: knee step})``."""
    knees = {r["config"]: knee_step(r.get("val_curve"), tol, window) for r in runs}
    knees = {k: v for k, v in knees.items() if v is not None}
    if not knees:
        return None, knees
    return -(-max(knees.values()) // multiple) * multiple, knees


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


def results_table(results: dict, summary: list[dict]) -> str:
    """Markdown: per configuration, test accuracy mean ± std over the seeds at the rate chosen
    on validation, then the chance rows."""
    from .dataset import QTYPES
    chance = results["chance"]
    qt = [t for t in QTYPES if t in chance]
    has_rel = LOCAL_TYPE in qt
    hdr = ["configuration", "visual tokens", "lr (val-selected of swept)", "seeds",
           *(QTYPE_TITLES[t] for t in qt), "mean", "final train loss", "on plateau",
           "image dependence (init → final)"]
    if has_rel:
        hdr.append("relevance in asked digit")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in summary:
        tok = str(r["visual_tokens"])
        if r["projector"].startswith("mlp"):
            tok += " (all patches)"
        swept = ", ".join(f"{x:g}" for x in r["swept"])
        edge = "" if r["inside"] or len(r["swept"]) < 2 else " (edge)"
        dep = r.get("image_dependence") or {}
        dep_s = (f"{dep['init'][0]:.2f} → {dep['final'][0]:.2f}"
                 if "init" in dep and "final" in dep else "")
        row = [r["config"], tok, f"{r['lr']:g} ({swept}){edge}", str(r["n_seeds"]),
               *(_pm(r["accuracy"][t]) for t in qt), _pm(r["overall"]),
               _pm(r["final_loss"]), f"{r['plateau']}/{r['n_seeds']}", dep_s]
        if has_rel:
            row.append(_pm(r["relevance_in_cell"]) if relevance_reported(r, chance)
                       else "— (cell at chance)")
        lines.append("| " + " | ".join(row) + " |")
    for key, label in (("uniform", "chance: uniform guess"),
                       ("majority", "chance: majority answer")):
        row = [label, "", "", "", *(f"{chance[t][key]:.3f}" for t in qt),
               f"{sum(chance[t][key] for t in qt) / len(qt):.3f}", "", "", ""]
        if has_rel:
            base = results.get("relevance_baseline")
            row.append(f"{base:.3f} (uniform map)" if key == "uniform" and base else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Markdown: every run (rate grids and seeds), validation and test mean accuracy."""
    hdr = ["configuration", "protocol", "lr", "seed", "val mean", "test mean",
           "final train loss", "plateau", "CPU s"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results["runs"]:
        lines.append("| " + " | ".join([
            r["config"], r["protocol"], f"{r['lr']:g}", str(r["seed"]), f"{r['val_overall']:.3f}",
            f"{r['overall']:.3f}", f"{r['final_loss']:.3f}", "yes" if r["plateau"] else "no",
            f"{r.get('cpu_s', r['train_s']):.0f}"]) + " |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> str:
    p = results["profile_settings"]
    seeds = list(p["seeds"])
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
    lm = results.get("lm_stats", {})
    lm_s = ("; ".join(f"seed {k}: final loss {v['final_loss']:.3f}" for k, v in lm.items())
            if lm else "")
    g = p["grid"]
    sched = p["lr_scheduler"]
    md = [f"# Digit-grid detail perception (`--profile {results['profile']}`)", "",
          f"{p['n_train']} training images: {g[0]}x{g[1]} handwritten digits (scikit-learn "
          f"`load_digits`) on a {p['pitch']} px pitch with random sub-cell offsets "
          f"({results['image_size'][0]} px, {p['patch']} px patches: patch grid "
          f"{results['visual_grid'][0]}x{results['visual_grid'][1]}); questions per image: "
          f"{', '.join(f'{t} x{k}' for t, k in results['train_repeats'].items())}. {tower}",
          "",
          f"Protocol `aligned`: LM trained {p['lm_steps']} steps on the text side (lr "
          f"{p['lm_lr']:g}{'; ' + lm_s if lm_s else ''}), stage 1 (projector only, LM frozen) "
          f"{p['s1_steps']} steps, stage 2 (projector + LM) {p['steps']} steps. Protocol "
          f"`joint`: projector + fresh LM, {p['s1_steps'] + p['steps']} steps. Batch "
          f"{p['batch']}, warmup ratio {p['warmup_ratio']}, {sched} schedule (stage 1: cosine), "
          f"weight decay {p['weight_decay']}. Rate chosen per configuration and protocol on "
          f"{results['n_val_questions']} validation questions (seed {seeds[0]}; grid widened "
          f"while the best rate is on its edge); test: {results['n_test_questions']} questions "
          f"on {p['n_test']} images of unseen handwriting; mean ± std over seeds {seeds} at that "
          "rate (std 0 with one seed); exact match of the greedy answer (read / row: share of "
          "digits right, in order).", ""]
    for protocol in PROTOCOLS:
        summ = [s for s in results["summary"] if s["protocol"] == protocol]
        if not summ:
            continue
        md += [f"## Protocol `{protocol}`", "", results_table(results, summ), ""]
        knee = results.get("knee", {}).get(protocol, {})
        if knee:
            md += ["Validation mean at the end of stage 2 minus the best before its last "
                   "quarter (seed 0, kept rate): "
                   + ", ".join(f"{k} {v:+.3f}" for k, v in knee.items()) + ".", ""]
    if results["profile"] == "cpu-pilot" and results["runs"]:
        budget, knees = budget_from_pilot(results["runs"])
        md += ["## Step budget", "",
               "Knee of each run's validation curve (first evaluation whose 3-evaluation moving "
               "average is within 0.02 of that average's maximum over the pilot): "
               + ", ".join(f"{k} {v}" for k, v in knees.items())
               + f". Stage-2 budget of the study (the latest knee, rounded up to a multiple of "
               f"200 steps): **{budget}**.", ""]
    md += ["On plateau: runs whose validation accuracy is within "
           f"{PLATEAU_MARGIN} of the majority answer on every question type (they learned the "
           "answer prior, not the images). Image dependence: share of the projector output's "
           "variance that changes from image to image (models/digits/run.py "
           "`image_dependence`, on 64 validation images), at initialisation and after training. "
           "Relevance in asked digit: share of the relevance map (models/digits/relevance.py) "
           "on the patches covered by the asked digit, mean over test cell questions; reported "
           "only where cell accuracy is above chance; the uniform-map baseline is the digit's "
           "share of the image.", ""]
    merged = results.get("merged_from")
    md += ["## All runs", "", runs_table(results), "",
           f"Wall-clock: {results['wall_clock_s']:.0f} s "
           f"{'for the longest of %d processes run side by side' % merged if merged else 'in all'}"
           f" (dataset build {results['dataset_s']:.1f} s); {results['cpu_s']:.0f} CPU s in all "
           f"(process time: about the wall-clock on an unloaded core), on {results['device']}, "
           f"load average {min(results['loadavg']):.1f}-{max(results['loadavg']):.1f} during "
           f"the run; torch {results['torch']}"
           f"{'; PARTIAL (run still going or cut off)' if not results.get('complete') else ''}.",
           "", "Plots: `loss_curves.png`, `val_curves.png`, `accuracy.png`"
           + (" (`relevance.png`: in each process's own folder)." if merged
              else ", `relevance.png`."), "",
           f"Command: `{results['command']}`", ""]
    (out / "results.md").write_text("\n".join(md))
    return "\n\n".join(results_table(results, [s for s in results["summary"]
                                                if s["protocol"] == pr])
                       for pr in PROTOCOLS
                       if any(s["protocol"] == pr for s in results["summary"]))


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .dataset import QTYPES
    protos = [pr for pr in PROTOCOLS if any(r["protocol"] == pr for r in results["runs"])]
    configs = list(dict.fromkeys(r["config"] for r in results["runs"]))
    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    chosen = {(s["config"], s["protocol"]): s["lr"] for s in results["summary"]}
    for fname, ylabel in (("loss_curves.png", "train loss (answer tokens)"),
                          ("val_curves.png", "validation mean accuracy")):
        fig, axes = plt.subplots(1, max(1, len(protos)), figsize=(6 * max(1, len(protos)), 3.8),
                                 dpi=80, squeeze=False)
        for ax, pr in zip(axes[0], protos):
            seen = set()
            for r in results["runs"]:
                if r["protocol"] != pr:
                    continue
                kept = chosen.get((r["config"], pr)) == r["lr"]
                c = colors[r["config"]]
                lab = r["config"] if r["config"] not in seen and kept else None
                if lab:
                    seen.add(r["config"])
                if fname == "loss_curves.png":
                    y = np.asarray(r["losses_stage1"] + r["losses"], float)
                    k = max(1, len(y) // 60)
                    ys = np.convolve(y, np.ones(k) / k, mode="valid")
                    x = np.arange(len(ys)) + k
                    ax.set_yscale("log")
                    if r["losses_stage1"]:
                        ax.axvline(len(r["losses_stage1"]), color="k", lw=0.5, ls=":")
                else:
                    if not r.get("val_curve"):
                        continue
                    x = np.asarray([v[0] for v in r["val_curve"]])
                    ys = np.asarray([v[1] for v in r["val_curve"]])
                ax.plot(x, ys, color=c, lw=1.0 if kept else 0.5, alpha=0.9 if kept else 0.3,
                        ls="--" if r["plateau"] else "-", label=lab)
            ax.set_xlabel("step (stage 1 then stage 2)" if fname == "loss_curves.png"
                          else "stage-2 step")
            ax.set_ylabel(ylabel)
            if seen:
                ax.legend(fontsize=7)
            ax.set_title(f"{pr}: every run (bold: kept rate; dashed: on the plateau)",
                         fontsize=9)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)

    qt = [t for t in QTYPES if t in results["chance"]]
    summ = results["summary"]
    if not summ:
        return
    fig, axes = plt.subplots(1, len(protos), figsize=(7 * len(protos), 3.6), dpi=80,
                             squeeze=False)
    for ax, pr in zip(axes[0], protos):
        rows = [s for s in summ if s["protocol"] == pr]
        w = 0.8 / max(1, len(rows))
        x = np.arange(len(qt))
        for i, r in enumerate(rows):
            ax.bar(x + (i - (len(rows) - 1) / 2) * w, [r["accuracy"][t][0] for t in qt], w,
                   yerr=[r["accuracy"][t][1] for t in qt], capsize=2, color=colors[r["config"]],
                   label=f"{r['config']}")
        for j, t in enumerate(qt):
            ax.hlines(results["chance"][t]["majority"], j - 0.45, j + 0.45, colors="k",
                      linestyles="--", lw=1, label="majority-answer chance" if j == 0 else None)
        ax.set_xticks(x, [QTYPE_TITLES[t] for t in qt], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test exact match (mean ± std)")
        ax.set_title(f"protocol {pr}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def _summaries(results: dict) -> list[dict]:
    p = results["profile_settings"]
    out = []
    for protocol, configs in p["protocols"].items():
        out += summarize(results["runs"], p["seeds"], protocol, configs=list(configs))
    return out


def _write(results: dict, out: Path) -> str:
    results["summary"] = _summaries(results)
    results["knee"] = {pr: knee_check(results["runs"], [s for s in results["summary"]
                                                         if s["protocol"] == pr],
                                      results["profile_settings"]["seeds"][0])
                       for pr in PROTOCOLS}
    table = write_report(results, out)
    plot(results, out)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    return table


def _save(results: dict, out: Path, t_start: float, c_start: float) -> str:
    results["wall_clock_s"] = results.get("resumed_wall_s", 0.0) + time.time() - t_start
    # CPU seconds of this process (one torch thread on a CPU): about the wall-clock it would take
    # on an unloaded core, whatever the load while it ran (+ those of the sessions resumed)
    results["cpu_s"] = results.get("resumed_cpu_s", 0.0) + time.process_time() - c_start
    results["loadavg"] = results.get("loadavg", []) + [round(os.getloadavg()[0], 2)]
    return _write(results, out)


def protocol_complete(runs: list[dict], p: dict) -> bool:
    """Every (configuration, protocol) of profile settings ``p``: its grid and widening ran with
    the first seed, and every seed at the kept rate."""
    seeds = list(p["seeds"])
    have = {run_key(r) for r in runs}
    for protocol, configs in p["protocols"].items():
        for label in configs:
            grid = p["lrs"][protocol][label]
            if rates_to_run(runs, label, protocol, grid, seeds[0], p["lr_widen"],
                            p["max_widen"]):
                return False
            lr = select_lr(runs, label, seeds[0], protocol)
            if any((label, protocol, lr, s) not in have for s in seeds):
                return False
    return True


def platform_info() -> dict:
    """What decides the floating-point path of a CPU run: CPU model, ATen's vector ISA, BLAS,
    library versions, threads."""
    import numpy
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cfg = torch.__config__.show()
    mkl = next((ln.strip(" -") for ln in cfg.splitlines() if "Math Kernel Library" in ln), None)
    return {"cpu": cpu, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": mkl, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def _merge_dicts_of_parts(parts, key):
    return {k: v for q in parts for k, v in q.get(key, {}).items()}


def merge_results(parts, out) -> dict:
    """Combine result folders of one profile run as separate processes (e.g. one per
    configuration), recompute the summaries (rates still chosen on validation) and write the
    report to ``out``. Wall-clock: the longest part; CPU s: the sum; complete:
    :func:`protocol_complete` over the union of the parts' configurations."""
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in parts]
    base = parts[0]
    for q in parts[1:]:
        if q["profile"] != base["profile"] or q["chance"] != base["chance"]:
            raise ValueError("merge_results: the parts are not of the same profile and data")
    runs, seen = [], set()
    for q in parts:
        for r in q["runs"]:
            if run_key(r) not in seen:
                seen.add(run_key(r))
                runs.append(r)
    p = dict(base["profile_settings"])
    protos: dict[str, list] = {}
    for q in parts:
        for pr, cs in q["profile_settings"]["protocols"].items():
            protos.setdefault(pr, [])
            protos[pr] += [c for c in cs if c not in protos[pr]]
    p["protocols"] = protos
    p["configs"] = list(dict.fromkeys(c for cs in protos.values() for c in cs))
    merged = {**base, "runs": runs, "profile_settings": p,
              "wall_clock_s": max(q["wall_clock_s"] for q in parts),
              "cpu_s": sum(q["cpu_s"] for q in parts),
              "loadavg": [x for q in parts for x in q.get("loadavg", [])],
              "tower_stats": _merge_dicts_of_parts(parts, "tower_stats"),
              "lm_stats": _merge_dicts_of_parts(parts, "lm_stats"),
              "command": " ; ".join(q["command"] for q in parts), "merged_from": len(parts)}
    merged["complete"] = (all(q.get("complete") for q in parts)
                          and protocol_complete(runs, p))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(merged, out)
    return merged


def _select(p: dict, configs=None, protocols=None) -> dict:
    """Profile settings restricted to ``configs`` / ``protocols`` (None: all of the profile)."""
    prot = {}
    for pr, cs in p["protocols"].items():
        if protocols is not None and pr not in protocols:
            continue
        keep = [c for c in cs if configs is None or c in configs]
        if keep:
            prot[pr] = tuple(keep)
    for pr in protocols or ():
        if pr not in p["protocols"]:
            raise ValueError(f"protocol {pr!r} is not in the profile ({sorted(p['protocols'])})")
    for c in configs or ():
        if not any(c in cs for cs in p["protocols"].values()):
            raise ValueError(f"configuration {c!r} is not in the profile ({p['configs']})")
    return {**p, "protocols": prot,
            "configs": tuple(c for c in p["configs"] if any(c in cs for cs in prot.values()))}


_DATA_KEYS = ("n_train", "n_val", "n_test", "grid", "pitch", "upsample", "qtypes",
              "train_repeats")
_TOWER_KEYS = (*_DATA_KEYS, "patch", "vision_hidden", "vision_layers", "vision_heads",
               "tower_steps", "tower_batch", "tower_lr", "cpu_threads")
_LM_KEYS = (*_TOWER_KEYS, "llm_hidden", "llm_layers", "llm_heads", "lm_steps", "lm_lr", "batch",
            "warmup_ratio", "weight_decay")


def _cached(cache, kind: str, keys, p: dict, seed: int, make):
    """``make() -> (state_dict, stats)``, or both loaded from ``cache`` (a folder, or None: no
    cache) where an earlier process of the same settings (``keys`` of ``p``) and ``seed`` saved
    them. Pretraining is deterministic on one machine, so a cached tower / LM is the one this
    process would train (the results record the cache file's settings)."""
    if cache is None:
        return make()
    import hashlib
    spec = json.dumps({k: p[k] for k in keys} | {"seed": seed, "kind": kind,
                                                   "torch": torch.__version__}, sort_keys=True,
                      default=list)
    path = Path(cache) / f"{kind}_{hashlib.sha256(spec.encode()).hexdigest()[:16]}_s{seed}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob["spec"] == spec:
            print(f"{kind} seed {seed}: loaded from {path}", flush=True)
            return blob["state"], blob["stats"]
    state, stats = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"spec": spec, "state": state, "stats": stats}, tmp)
    os.replace(tmp, path)
    return state, stats


def run_study(profile: str = "cpu", out="runs/digits_cpu", *, configs=None, protocols=None,
              overrides: dict | None = None, keep_runs: bool = False,
              command: str | None = None, cache=None, resume: bool = False) -> dict:
    """Build the data, pretrain the tower(s) and LM(s) (or load them from ``cache``, a folder
    shared by the processes of one study), run every configuration's rate grid and seeds, write
    the report after every run. ``resume``: keep the runs of an interrupted ``out/results.json``
    of the same profile settings and machine, and run only the missing ones (a run does not
    depend on the runs before it). Returns the results dict (also ``out/results.json``)."""
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
    p = _select({**PROFILES[name], **(overrides or {})}, configs, protocols)
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
        # times faster than two on a 2-core machine (and far faster when the cores are shared);
        # it also fixes the reduction order, hence the losses, for a given machine
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
        gh, gw = visual_grid(p)
        print(f"profile {name}: {p['n_train']} train images, {len(evals['val'])} val / "
              f"{len(evals['test'])} test questions, image {data['image_size'][0]} px, patch "
              f"grid {gh}x{gw}, dataset built in {t_data:.1f}s", flush=True)
        reps = {t: (p.get("train_repeats") or {}).get(t, 1) for t in qtypes}
        results = {"profile": name, "profile_settings": p, "chance": data["chance"],
                   "chance_val": data["chance_val"], "train_repeats": reps,
                   "grid": list(p["grid"]), "image_size": list(data["image_size"]),
                   "visual_grid": [gh, gw], "n_test_questions": len(evals["test"]),
                   "n_val_questions": len(evals["val"]), "dataset_s": t_data,
                   "runs": [], "summary": [], "tower_stats": {}, "lm_stats": {},
                   "complete": False, "platform": platform_info(),
                   "device": (torch.cuda.get_device_name() if cuda else
                              f"CPU ({torch.get_num_threads()} threads, "
                              f"{platform.processor() or platform.machine()})"),
                   "torch": torch.__version__,
                   "command": command or f"python -m models.digits.run --profile {profile} "
                                         f"--out {out}"}
        prev_file = out / "results.json"
        if resume and prev_file.is_file():
            prev = json.loads(prev_file.read_text())
            want = json.loads(json.dumps(p))
            if prev["profile"] != name or prev["profile_settings"] != want:
                raise ValueError(f"--resume: {prev_file} is not of these profile settings")
            if prev["platform"] != results["platform"]:
                raise ValueError(f"--resume: {prev_file} ran on another platform "
                                 f"({prev['platform']}); its runs would not be reproduced here")
            results["runs"] = prev["runs"]
            results["tower_stats"], results["lm_stats"] = prev["tower_stats"], prev["lm_stats"]
            results["resumed_cpu_s"] = prev["cpu_s"]
            results["resumed_wall_s"] = prev["wall_clock_s"]
            results["loadavg"] = prev.get("loadavg", [])
            results["sessions"] = prev.get("sessions", 1) + 1
            print(f"resuming {prev_file}: {len(prev['runs'])} runs kept", flush=True)
        towers, lms = {}, {}

        def tower_for(seed):
            if seed not in towers:
                def make():
                    tw, st = pretrain_tower(comp["vision_tower"], comp["image_processor"],
                                            data, steps=p["tower_steps"],
                                            batch=p["tower_batch"], lr=p["tower_lr"],
                                            seed=seed, patch=p["patch"],
                                            upsample=p["upsample"])
                    st["losses"] = st["losses"][::max(1, len(st["losses"]) // 100)]
                    return tw.state_dict(), st
                state, st = _cached(cache, "tower", _TOWER_KEYS, p, seed, make)
                import transformers as tf

                from .tower import freeze
                tw = tf.CLIPVisionModel(comp["vision_tower"])
                tw.load_state_dict(state)
                freeze(tw)
                print(f"tower seed {seed}: per-patch accuracy {st['patch_acc']} "
                      f"({st['seconds']:.1f}s)", flush=True)
                towers[seed] = tw
                results["tower_stats"][str(seed)] = st
            return towers[seed]

        def lm_for(seed):
            if seed not in lms:
                state, st = _cached(cache, "lm", _LM_KEYS, p, seed,
                                    lambda: pretrain_lm(tower_for(seed), comp, data, work, p,
                                                        seed))
                print(f"LM seed {seed}: text-side loss {st['final_loss']:.3f} "
                      f"({st['seconds']:.1f}s)", flush=True)
                lms[seed] = state
                results["lm_stats"][str(seed)] = st
            return lms[seed]

        from .dataset import batches
        dep_recs = list({r["image"]: r for r in evals["val"]}.values())[:p["n_dependence"]]
        dep_images = [im for _, ims, _ in batches(dep_recs, data["image_folder"], 10 ** 6)
                      for im in ims]
        ctx = {"p": p, "data": data, "comp": comp, "evals": evals, "work": work, "impl": impl,
               "tower_for": tower_for, "lm_for": lm_for,
               "dependence_pixels": comp["image_processor"](
                   images=dep_images, return_tensors="pt")["pixel_values"]}
        rel_recs = [r for r in evals["test"] if r["qtype"] == LOCAL_TYPE]
        n_rel = max(p["n_relevance_score"], p["n_relevance"])
        rel_maps = {}

        def one(label, protocol, lr, seed):
            if any(run_key(r) == (label, protocol, lr, seed) for r in results["runs"]):
                return  # resumed
            r, model = run_one(ctx, label, protocol, lr, seed)
            if rel_recs:
                rel = relevance_study(model, rel_recs[:n_rel], data["image_folder"])
                r.update(relevance_in_cell=rel["in_cell"], relevance_method=rel["method"],
                         relevance_baseline=rel["baseline"])
                results["relevance_baseline"] = rel["baseline"]
                rel_maps[(label, protocol, lr, seed)] = rel["maps"][:p["n_relevance"]]
            results["runs"].append(r)
            _save(results, out, t_start, cpu0)

        seeds = list(p["seeds"])
        if p.get("prepare_only"):
            for seed in seeds:
                tower_for(seed)
                if "aligned" in p["protocols"]:
                    lm_for(seed)
            print(f"prepared towers / LMs of seeds {seeds} in {cache}")
            return results
        # per (protocol, configuration): the seed-0 grid (widened while the best rate is on
        # its edge), then the other seeds at the kept rate; a cut-off run keeps whole groups
        for protocol, cfgs in p["protocols"].items():
            for label in cfgs:
                grid = p["lrs"][protocol][label]
                while todo := rates_to_run(results["runs"], label, protocol, grid, seeds[0],
                                           p["lr_widen"], p["max_widen"]):
                    for lr in todo:
                        one(label, protocol, lr, seeds[0])
                lr = select_lr(results["runs"], label, seeds[0], protocol)
                for seed in seeds[1:]:
                    one(label, protocol, lr, seed)
        if rel_recs:
            first = next(iter(p["protocols"]))
            best = {s["config"]: rel_maps[(s["config"], first, s["lr"], seeds[0])]
                    for s in results["summary"] if s["protocol"] == first
                    and (s["config"], first, s["lr"], seeds[0]) in rel_maps}
            save_relevance_figure(out / "relevance.png", rel_recs[:p["n_relevance"]],
                                  data["image_folder"], best)
        results["complete"] = True
        table = _save(results, out, t_start, cpu0)
    finally:
        torch.set_num_threads(threads)
        if not keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table)
    print(f"\nwall-clock {results['wall_clock_s']:.0f}s, {results['cpu_s']:.0f} CPU s; wrote "
          f"{out}/results.md, results.json, loss_curves.png, val_curves.png, accuracy.png, "
          "relevance.png")
    return results


# ------------------------------------------------------------------------------ reproduction
CHECKED = ("losses_stage1", "losses", "val_curve", "answers", "accuracy", "val")


def compare_results(new: dict, ref: dict) -> list[str]:
    """Differences between two results dicts of the same profile: every run of ``ref`` must be
    in ``new`` with bit-identical losses, validation curve, answers and accuracies (and the
    same tower / LM pretraining losses). Returns one line per difference ([] when identical)."""
    diffs = []
    for kind in ("tower_stats", "lm_stats"):
        for seed, st in ref.get(kind, {}).items():
            got = new.get(kind, {}).get(seed)
            if got is None or got["losses"] != st["losses"]:
                diffs.append(f"{kind} seed {seed}: pretraining losses differ")
    have = {run_key(r): r for r in new["runs"]}
    for r in ref["runs"]:
        k = run_key(r)
        if k not in have:
            diffs.append(f"run {k}: not in the new results")
            continue
        for field in CHECKED:
            a, b = have[k].get(field), r.get(field)
            if a == b:
                continue
            where = ""
            if isinstance(a, list) and isinstance(b, list):
                i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                where = f" (first at index {i}: {a[i] if i < len(a) else None!r} vs " \
                        f"{b[i] if i < len(b) else None!r})"
            diffs.append(f"run {k}: {field} differs{where}")
    return diffs


def check(profile: str, ref_dir, out, **kw) -> bool:
    """Rerun ``profile`` into ``out`` and compare with ``ref_dir/results.json``
    (:func:`compare_results`). Prints the verdict (and the platform differences) and returns
    True when every run is bit-identical."""
    ref = json.loads((Path(ref_dir) / "results.json").read_text())
    if ref["profile"] != resolve_profile(profile):
        raise ValueError(f"--check: {ref_dir} holds profile {ref['profile']!r}, not "
                         f"{resolve_profile(profile)!r}")
    new = run_study(profile, out, **kw)
    diffs = compare_results(new, ref)
    if not diffs:
        print(f"\ncheck: every run of {ref_dir} reproduced bit for bit "
              f"({len(ref['runs'])} runs: losses, validation curves, answers)")
        return True
    print(f"\ncheck: {len(diffs)} differences from {ref_dir}:")
    for d in diffs[:20]:
        print("  " + d)
    plat_ref, plat_new = ref.get("platform", {}), new.get("platform", {})
    pd = {k: (plat_ref.get(k), plat_new.get(k)) for k in set(plat_ref) | set(plat_new)
          if plat_ref.get(k) != plat_new.get(k)}
    if pd:
        print("platform differences (reference vs this machine): "
              + "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in sorted(pd.items())))
        print("other CPUs / libraries round differently and the training amplifies it: the "
              "reference is reproducible on its platform only")
    return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.digits.run",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="auto", choices=[*PROFILES, "auto"])
    ap.add_argument("--out", default=None,
                    help="output folder (default runs/digits_<profile>, git-ignored)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated configurations of the profile (default: all)")
    ap.add_argument("--protocols", default=None,
                    help=f"comma-separated protocols of the profile ({', '.join(PROTOCOLS)})")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (first: the grid's)")
    ap.add_argument("--tower", default=None, choices=["pretrained", "scratch"],
                    help="frozen pretrained tower (default) or trained from scratch")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result folders to combine into --out (no training)")
    ap.add_argument("--check", default=None, metavar="DIR",
                    help="rerun the profile and compare every run with DIR/results.json bit "
                         "for bit (exit status 1 when they differ)")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="save / load the pretrained towers and LMs here (share them between "
                         "the processes of one study; --prepare fills it)")
    ap.add_argument("--prepare", action="store_true",
                    help="only pretrain the towers and LMs of the profile's seeds into --cache")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs of an interrupted --out of the same settings, run the "
                         "missing ones")
    ap.add_argument("--keep_runs", action="store_true",
                    help="keep the data and checkpoints under <out>/digits_*")
    a = ap.parse_args(argv)
    name = resolve_profile(a.profile)
    out = a.out or f"runs/digits_{name}" + ("_check" if a.check else "")
    if a.merge:
        merge_results([d for d in a.merge.split(",") if d], out)
        print((Path(out) / "results.md").read_text())
        return
    over = {k: v for k, v in (("tower", a.tower),) if v is not None}
    if a.seeds:
        over["seeds"] = tuple(int(x) for x in a.seeds.split(","))
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    kw = dict(configs=a.configs.split(",") if a.configs else None,
              protocols=a.protocols.split(",") if a.protocols else None,
              overrides=over, keep_runs=a.keep_runs, cache=a.cache, resume=a.resume,
              command=f"python -m models.digits.run {argv_s}".strip())
    if a.prepare:
        if not a.cache:
            ap.error("--prepare needs --cache")
        kw["overrides"] = {**over, "prepare_only": True}
    if a.check:
        sys.exit(0 if check(a.profile, a.check, out, **kw) else 1)
    run_study(a.profile, out, **kw)


if __name__ == "__main__":
    main()
