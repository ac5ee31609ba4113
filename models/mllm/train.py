"""Two-stage LLaVA-style training of an :class:`~models.mllm.MLLM` (any registry projector).

Stage 1 trains the projector only (vision tower and LLM frozen): lr 1e-3, global batch 256.
Stage 2 trains the projector plus LoRA adapters on the LLM (``--llm_mode lora``, rank 256,
alpha 512: ParGo's rank with LLaVA-1.5's alpha = 2 x rank) or the whole LLM
(``--llm_mode full``): lr 2e-5, global batch 128. Both: cosine schedule, warmup ratio 0.03,
1 epoch, weight decay 0, AdamW, gradient clipping 1.0.

    python -m models.train --stage 1 --data_path blip_558k.json --image_folder images \\
        --vision_tower openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 \\
        --projector pargo --output_dir runs/stage1
    python -m models.train export --checkpoint runs/stage2/checkpoint-final --output merged/

Runs as one process, under ``torchrun`` (PyTorch DDP) or under ``deepspeed`` with
``--deepspeed models/configs/zero2.json`` (DeepSpeed is imported only then). The global batch
is ``per_device_batch_size x accumulation x world_size``; the accumulation is computed from
``--global_batch_size``. The loss of a step is the token mean over the whole global batch (the
token count is all-reduced before the backward), so it does not depend on how the batch is
split over processes and micro-batches.

Programmatic use: ``train(TrainConfig(...), model=None)`` returns the final metrics;
``vision_tower`` / ``llm`` / ``tokenizer`` / ``image_processor`` may be configs, modules or
tokenizer objects there, or pass a ready ``MLLM`` as ``model``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STAGE_DEFAULTS = {1: dict(learning_rate=1e-3, global_batch_size=256, per_device_batch_size=32),
                  2: dict(learning_rate=2e-5, global_batch_size=128, per_device_batch_size=16)}
RUN_CONFIG = "run_config.json"
_COMPONENTS = ("vision_tower", "llm", "tokenizer", "image_processor")


@dataclass
class TrainConfig:
    """Every CLI flag of ``python -m models.train`` (``None`` = the stage's default)."""
    output_dir: str = "runs/mllm"
    data_path: Any = None                 # LLaVA JSON path or a list of records
    image_folder: str | None = None
    stage: int = 1
    vision_tower: Any = None              # name / path / config / module
    llm: Any = None                       # name / path / config / module
    tokenizer: Any = None                 # name / path / tokenizer (default: llm)
    image_processor: Any = None           # name / path / processor (default: vision_tower's,
    projector: str = "mlp2x_gelu"         # or a CLIPImageProcessor at the tower's image_size)
    projector_kwargs: dict = field(default_factory=dict)
    vision_feature_layer: int = -2
    tune_vision_tower: bool = False
    from_stage1: str | None = None        # stage-1 output dir: its components + projector
    pretrain_projector: str | None = None  # projector.pt to start from
    llm_mode: str = "lora"                # stage 2: "lora" or "full"
    lora_r: int = 256
    lora_alpha: int = 512
    lora_dropout: float = 0.05
    template: str = "vicuna_v1"
    max_length: int = 2048
    on_missing_image: str = "skip"
    num_train_epochs: int = 1
    max_steps: int = -1
    global_batch_size: int | None = None
    per_device_batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    save_steps: int = 0                   # 0: only the final checkpoint
    resume: str | None = None             # checkpoint dir or "latest"
    log_file: str | None = None           # default <output_dir>/log.jsonl
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    log_sample_ids: bool = False          # <output_dir>/samples_rank{r}.jsonl: ids per step


# ------------------------------------------------------------------------------ config handling
def _as_config(cfg) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return dataclasses.replace(cfg)
    if isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if isinstance(cfg, dict):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown training options: {unknown}")
        return TrainConfig(**cfg)
    raise TypeError(f"config must be a TrainConfig, a Namespace or a dict, got {type(cfg).__name__}")


def _resolve(cfg: TrainConfig, world_size: int) -> TrainConfig:
    if cfg.stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage must be 1 or 2, got {cfg.stage}")
    if cfg.llm_mode not in ("lora", "full"):
        raise ValueError(f"llm_mode must be 'lora' or 'full', got {cfg.llm_mode!r}")
    if cfg.lr_scheduler not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr_scheduler must be cosine, linear or constant, got {cfg.lr_scheduler!r}")
    if cfg.from_stage1 is not None:
        with open(Path(cfg.from_stage1) / RUN_CONFIG) as f:
            prev = json.load(f)
        for k in _COMPONENTS:
            if getattr(cfg, k) is None:
                setattr(cfg, k, prev["components"][k])
        cfg.projector = prev["mllm"]["projector"]["name"]
        cfg.projector_kwargs = {k: v for k, v in prev["mllm"]["projector"].items()
                                if k not in ("name", "vision_width", "llm_width", "visual_grid")}
        cfg.vision_feature_layer = prev["mllm"]["vision_feature_layer"]
        if cfg.pretrain_projector is None:
            cfg.pretrain_projector = str(Path(cfg.from_stage1) / "projector.pt")
    d = STAGE_DEFAULTS[cfg.stage]
    if cfg.learning_rate is None:
        cfg.learning_rate = d["learning_rate"]
    if cfg.global_batch_size is None:
        cfg.global_batch_size = d["global_batch_size"]
    if cfg.per_device_batch_size is None:
        cfg.per_device_batch_size = max(1, min(d["per_device_batch_size"],
                                               cfg.global_batch_size // world_size))
    for name in ("global_batch_size", "per_device_batch_size", "num_train_epochs"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if cfg.global_batch_size % (cfg.per_device_batch_size * world_size):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} must be a multiple of "
                         f"per_device_batch_size {cfg.per_device_batch_size} x world size "
                         f"{world_size}")
    if cfg.data_path is None:
        raise ValueError("data_path is required")
    return cfg


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """``global_batch / (per_device_batch * world_size)``, which must be a whole number."""
    if global_batch % (per_device_batch * world_size):
        raise ValueError(f"global_batch {global_batch} is not a multiple of per_device_batch "
                         f"{per_device_batch} x world_size {world_size}")
    return global_batch // (per_device_batch * world_size)


def lr_lambda(kind: str, warmup: int, total: int):
    """HF-style schedules: linear warmup, then cosine / linear decay to 0, or constant."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def resolve_deepspeed_config(path_or_dict, cfg: TrainConfig, accumulation: int, world_size: int,
                             hidden_size: int) -> dict:
    """Fill the HF-style ``"auto"`` values of a DeepSpeed config from the training options."""
    if isinstance(path_or_dict, dict):
        ds = json.loads(json.dumps(path_or_dict))
    else:
        with open(path_or_dict) as f:
            ds = json.load(f)
    fill = {"train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": cfg.global_batch_size,
            "gradient_clipping": cfg.max_grad_norm}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
        elif ds[k] != v:
            raise ValueError(f"deepspeed config {k}={ds[k]} disagrees with the training options "
                             f"({v}); set it to \"auto\"")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bool(cfg.bf16)
    if "fp16" in ds and ds["fp16"].get("enabled") == "auto":
        ds["fp16"]["enabled"] = False
    zero = ds.get("zero_optimization", {})
    auto_zero = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
    for k, v in auto_zero.items():
        if zero.get(k) == "auto":
            zero[k] = v
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("the deepspeed config must not define optimizer/scheduler: the trainer "
                         "builds AdamW and the schedule from its own options")
    ds.setdefault("zero_allow_untested_optimizer", True)
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ValueError(f"cannot resolve deepspeed config 'auto' values: {left}")
    return ds


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self):
        if self.active and self.world_size > 1:
            torch.distributed.barrier()


def _setup_dist(use_deepspeed: bool) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if use_deepspeed:
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return _Dist(rank, world, local, device)


# ---------------------------------------------------------------------------------- model setup
def _spec_str(spec) -> str | None:
    return str(spec) if isinstance(spec, (str, os.PathLike)) else None


def build_model(cfg: TrainConfig, model=None):
    """The MLLM of ``cfg`` (or ``model``), with the stage's trainable parameters set up."""
    from .model import MLLM
    if model is None:
        if cfg.vision_tower is None or cfg.llm is None:
            raise ValueError("vision_tower and llm are required (or pass model=)")
        model = MLLM.build(cfg.vision_tower, cfg.llm, cfg.projector, tokenizer=cfg.tokenizer,
                           image_processor=(cfg.image_processor if cfg.image_processor is not None
                                            else _processor_default(cfg.vision_tower)),
                           projector_kwargs=cfg.projector_kwargs,
                           vision_feature_layer=cfg.vision_feature_layer)
    elif not isinstance(model, MLLM):
        raise TypeError(f"model must be an MLLM, got {type(model).__name__}")
    if cfg.pretrain_projector:
        model.projector.load_state_dict(torch.load(cfg.pretrain_projector, map_location="cpu"))
    model.vision_tower.requires_grad_(cfg.tune_vision_tower)
    model.llm.requires_grad_(False)
    model.projector.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.llm.config.use_cache = False
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.stage == 2:
        if cfg.llm_mode == "lora":
            model.apply_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        else:
            model.llm.requires_grad_(True)
    return model


def _processor_default(vision_tower):
    """The tower's own image processor when it is a name/path that has one, else None (built
    from the tower config)."""
    if isinstance(vision_tower, (str, os.PathLike)):
        p = Path(vision_tower)
        if not p.exists() or (p / "preprocessor_config.json").is_file():
            return str(vision_tower)
    return None


def _save_components(model, cfg: TrainConfig, out: Path) -> dict:
    """Specs (strings) from which the base model can be rebuilt; components given as objects
    (and an LLM whose vocabulary grew by ``<image>``) are saved under ``out/base``."""
    base = out / "base"
    specs = {}
    llm = model.llm.get_base_model() if model.is_lora else model.llm
    resized = getattr(model, "llm_resized", False)
    for name, obj in (("vision_tower", model.vision_tower), ("llm", llm)):
        spec = _spec_str(getattr(cfg, name))
        if spec is None or (name == "llm" and resized):
            spec = str(base / name)
            obj.save_pretrained(spec)
        specs[name] = spec
    specs["tokenizer"] = str(base / "tokenizer")
    model.tokenizer.save_pretrained(specs["tokenizer"])
    specs["image_processor"] = str(base / "image_processor")
    model.image_processor.save_pretrained(specs["image_processor"])
    return specs


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _gathered(params, zero3: bool):
    if zero3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def _rng_state() -> dict:
    import numpy as np
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    import numpy as np
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _latest_checkpoint(output_dir: Path) -> Path:
    ckpts = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.pt").is_file()]
    if not ckpts:
        raise ValueError(f"resume='latest' but {str(output_dir)!r} has no checkpoint-*")
    return max(ckpts, key=lambda p: torch.load(p / "trainer_state.pt", weights_only=False)["step"])


# --------------------------------------------------------------------------------------- train
def train(config, *, model=None, on_step=None) -> dict:
    """Train per ``config`` (a :class:`TrainConfig`, an ``argparse.Namespace`` or a dict).

    ``on_step``, when given, is called on the main process with each step's log record (the
    dict written to ``log.jsonl``: ``step``, ``loss``, ``lr``, ``time``, ...), e.g. to print
    progress. Training the whole model (tower, projector and LLM, e.g. from scratch) is
    ``stage=2, llm_mode="full", tune_vision_tower=True``.

    Returns ``{"step", "loss", "losses", "lr", "samples", "train_runtime", "samples_per_s",
    "skipped_images", "missing_images", "checkpoint", "output_dir"}``; ``losses`` has the
    global-batch loss of every step run by this call.
    """
    cfg = _as_config(config)
    dist = _setup_dist(cfg.deepspeed is not None)
    cfg = _resolve(cfg, dist.world_size)
    accum = accumulation_steps(cfg.global_batch_size, cfg.per_device_batch_size, dist.world_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = None
    if cfg.resume:
        resume_dir = _latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if not (resume_dir / "trainer_state.pt").is_file():
            raise ValueError(f"resume {str(resume_dir)!r} is not a checkpoint directory")
        with open(resume_dir / RUN_CONFIG) as f:
            prev = json.load(f)
        if model is None:  # rebuild exactly the saved base components
            for k in _COMPONENTS:
                setattr(cfg, k, prev["components"][k])
            cfg.from_stage1 = None

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, model)
    mllm = model
    if resume_dir is not None:
        state = torch.load(resume_dir / "trainable.pt", map_location="cpu")
        missing = set(_trainable_state(mllm)) - set(state)
        if missing:
            raise ValueError(f"checkpoint {str(resume_dir)!r} lacks trainable tensors "
                             f"{sorted(missing)[:5]}")
        mllm.load_state_dict(state, strict=False)
    specs = None
    if dist.is_main:
        specs = _save_components(mllm, cfg, out) if resume_dir is None else prev["components"]
    mllm.to(dist.device)

    from .data import Collator, LLaVADataset, global_batches
    dataset = LLaVADataset(cfg.data_path, cfg.image_folder, mllm.tokenizer, mllm.image_processor,
                           image_token_id=mllm.image_token_id,
                           num_image_tokens=mllm.num_visual_tokens, template=cfg.template,
                           max_length=cfg.max_length, on_missing=cfg.on_missing_image)
    collate = Collator(mllm.tokenizer.pad_token_id, "right")
    steps_per_epoch = math.ceil(len(dataset) / cfg.global_batch_size)
    total_steps = (cfg.max_steps if cfg.max_steps > 0
                   else steps_per_epoch * cfg.num_train_epochs)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    params = [p for p in mllm.parameters() if p.requires_grad]
    decay = [p for n, p in mllm.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in mllm.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_scheduler, warmup, total_steps))

    engine = None
    zero3 = False
    if cfg.deepspeed is not None:
        import deepspeed
        hidden = mllm.llm.get_input_embeddings().embedding_dim
        ds_cfg = resolve_deepspeed_config(cfg.deepspeed, cfg, accum, dist.world_size, hidden)
        zero3 = ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=mllm, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        runner = engine
    elif dist.world_size > 1:
        runner = nn.parallel.DistributedDataParallel(
            mllm, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    else:
        runner = mllm

    start_step = 0
    if resume_dir is not None:
        tstate = torch.load(resume_dir / "trainer_state.pt", map_location="cpu",
                            weights_only=False)
        start_step = tstate["step"]
        if engine is not None:
            engine.load_checkpoint(str(resume_dir / "deepspeed"), tag="ds",
                                   load_module_strict=False)
        else:
            optimizer.load_state_dict(tstate["optimizer"])
            scheduler.load_state_dict(tstate["scheduler"])
        rng_file = resume_dir / f"rng_rank{dist.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    log_path = Path(cfg.log_file) if cfg.log_file else out / "log.jsonl"
    log = open(log_path, "a") if dist.is_main else None

    def write_log(rec):
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    write_log({"event": "start", "stage": cfg.stage, "world_size": dist.world_size,
               "global_batch_size": cfg.global_batch_size,
               "per_device_batch_size": cfg.per_device_batch_size,
               "gradient_accumulation_steps": accum, "total_steps": total_steps,
               "samples": len(dataset), "missing_images": len(dataset.missing_files),
               "missing_files": dataset.missing_files[:100], "resume_from_step": start_step,
               "trainable_params": sum(p.numel() for p in params),
               "deepspeed": cfg.deepspeed is not None})

    def save(step: int, final: bool = False) -> Path:
        ck = out / f"checkpoint-{step}"
        named = [(n, p) for n, p in mllm.named_parameters() if p.requires_grad]
        with _gathered([p for _, p in named], zero3):
            if dist.is_main:
                ck.mkdir(parents=True, exist_ok=True)
                torch.save({n: p.detach().cpu().clone() for n, p in named}, ck / "trainable.pt")
                _save_artifacts(mllm, ck)
                if final:
                    _save_artifacts(mllm, out)
        if engine is not None:
            engine.save_checkpoint(str(ck / "deepspeed"), tag="ds", exclude_frozen_parameters=True)
        ck.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), ck / f"rng_rank{dist.rank}.pt")
        if dist.is_main:
            state = {"step": step, "total_steps": total_steps, "config": _jsonable(cfg)}
            if engine is None:
                state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            torch.save(state, ck / "trainer_state.pt")
            with open(ck / RUN_CONFIG, "w") as f:
                json.dump(run_config, f, indent=2)
        dist.barrier()
        return ck

    run_config = {"components": specs, "mllm": mllm.config_dict(), "stage": cfg.stage,
                  "llm_mode": cfg.llm_mode if cfg.stage == 2 else "frozen",
                  "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                           "dropout": cfg.lora_dropout}, "config": _jsonable(cfg)}
    if dist.is_main:
        with open(out / RUN_CONFIG, "w") as f:
            json.dump(run_config, f, indent=2)

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and dist.is_main),
               desc=f"stage {cfg.stage}", dynamic_ncols=True)
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16)
                if cfg.bf16 and engine is None else contextlib.nullcontext())
    runner.train()
    losses, step, samples, skipped, t0 = [], start_step, 0, 0, time.time()
    last_ck = None
    lr = optimizer.param_groups[0]["lr"]
    while step < total_steps:
        epoch = step // steps_per_epoch
        plan = global_batches(len(dataset), global_batch=cfg.global_batch_size,
                              per_device_batch=cfg.per_device_batch_size,
                              world_size=dist.world_size, rank=dist.rank, seed=cfg.seed,
                              epoch=epoch)
        flat = [mb for s in plan[step - epoch * steps_per_epoch:] for mb in s]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=flat, collate_fn=collate,
                                             num_workers=cfg.num_workers)
        it = iter(loader)
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            ts = time.time()
            lr = optimizer.param_groups[0]["lr"]
            micro = [next(it) for _ in range(accum)]
            n_tok = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum())
                                           for b in micro)), device=dist.device)
            global_tokens = dist.all_reduce(n_tok).clamp(min=1.0)
            loss_sum = torch.zeros((), device=dist.device)
            for i, b in enumerate(micro):
                batch = {k: (b[k].to(dist.device) if b[k] is not None else None)
                         for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
                sync = (contextlib.nullcontext() if engine is not None or i == accum - 1
                        or not isinstance(runner, nn.parallel.DistributedDataParallel)
                        else runner.no_sync())
                with sync:
                    with autocast:
                        o = runner(**batch)
                    loss = o["loss_sum"] / global_tokens * dist.world_size
                    if engine is not None:
                        engine.backward(loss, scale_wrt_gas=False)
                        engine.step()
                    else:
                        loss.backward()
                loss_sum += o["loss_sum"].detach().float()
            if engine is not None:
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                                  if cfg.max_grad_norm > 0 else float("nan"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if cfg.log_sample_ids:
                with open(out / f"samples_rank{dist.rank}.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "ids": [i for b in micro
                                                                    for i in b["ids"]]}) + "\n")
            step_loss = float(dist.all_reduce(loss_sum) / global_tokens)
            n_samples = torch.tensor([float(sum(len(b["ids"]) for b in micro)),
                                      float(sum(b["skipped"] for b in micro)),
                                      float(sum(b["num_images"] for b in micro))])
            n_samples = dist.all_reduce(n_samples.to(dist.device)).cpu()
            dt = max(time.time() - ts, 1e-9)
            samples += int(n_samples[0])
            skipped += int(n_samples[1])
            losses.append(step_loss)
            step += 1
            rec = {"step": step, "epoch": step / steps_per_epoch, "loss": step_loss, "lr": lr,
                   "grad_norm": grad_norm, "samples_per_s": float(n_samples[0]) / dt,
                   "visual_tokens_per_s": float(n_samples[2]) * mllm.num_visual_tokens / dt,
                   "tokens": float(global_tokens), "samples": samples,
                   "skipped_images": skipped, "time": time.time() - t0}
            write_log(rec)
            if on_step is not None and dist.is_main:
                on_step(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                            sps=f"{rec['samples_per_s']:.1f}",
                            vtok_s=f"{rec['visual_tokens_per_s']:.0f}")
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
                last_ck = save(step)
    bar.close()
    last_ck = save(step, final=True)
    runtime = time.time() - t0
    result = {"step": step, "loss": losses[-1] if losses else None, "losses": losses, "lr": lr,
              "samples": samples, "train_runtime": runtime,
              "samples_per_s": samples / max(runtime, 1e-9), "skipped_images": skipped,
              "missing_images": len(dataset.missing_files), "checkpoint": str(last_ck),
              "output_dir": str(out)}
    write_log({"event": "end", **{k: v for k, v in result.items() if k != "losses"}})
    if log is not None:
        log.close()
    return result


def _save_artifacts(mllm, d: Path) -> None:
    """projector.pt + projector_config.json, and adapter/ (LoRA) or llm/ (full LLM) when the LLM
    trains."""
    from ..projectors.registry import save_projector_config
    torch.save({k: v.detach().cpu() for k, v in mllm.projector.state_dict().items()},
               d / "projector.pt")
    save_projector_config(mllm.projector, d / "projector_config.json")
    if mllm.is_lora:
        mllm.llm.save_pretrained(d / "adapter")
    elif any(p.requires_grad for p in mllm.llm.parameters()):
        mllm.llm.save_pretrained(d / "llm")


def _jsonable(cfg: TrainConfig) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        try:
            json.dumps(v)
        except TypeError:
            v = f"<{type(v).__name__}>"
        out[f.name] = v
    return out


# -------------------------------------------------------------------------------------- export
def load_checkpoint_model(checkpoint, torch_dtype=None):
    """The MLLM of a training checkpoint (base components + projector + adapters / LLM)."""
    from .model import MLLM
    ck = Path(checkpoint)
    if not (ck / RUN_CONFIG).is_file():
        raise ValueError(f"checkpoint {str(ck)!r} has no {RUN_CONFIG}")
    with open(ck / RUN_CONFIG) as f:
        rc = json.load(f)
    comp = rc["components"]
    llm = str(ck / "llm") if (ck / "llm").is_dir() else comp["llm"]
    import transformers as tf
    llm_model = tf.AutoModelForCausalLM.from_pretrained(llm, dtype=torch_dtype)
    model = MLLM.build(comp["vision_tower"], llm_model, rc["mllm"]["projector"],
                       tokenizer=comp["tokenizer"], image_processor=comp["image_processor"],
                       vision_feature_layer=rc["mllm"]["vision_feature_layer"])
    model.projector.load_state_dict(torch.load(ck / "projector.pt", map_location="cpu"))
    if (ck / "adapter").is_dir():
        model.load_lora(ck / "adapter")
    return model


def export_merged(checkpoint, output) -> Path:
    """Write a self-contained MLLM directory with LoRA merged into the LLM:
    ``AutoModelForCausalLM.from_pretrained(output)`` loads the LLM, ``MLLM.from_pretrained``
    the whole model."""
    model = load_checkpoint_model(checkpoint)
    if model.is_lora:
        model.merge_lora()
    model.save_pretrained(output)
    return Path(output)


# ----------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.train",
                                description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        name = f"--{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "projector_kwargs":
            p.add_argument(name, type=json.loads, default={},
                           help="JSON dict of extra projector arguments")
        elif f.name == "progress":
            p.add_argument("--no_progress", dest="progress", action="store_false")
        elif isinstance(default, bool):
            p.add_argument(name, action="store_true")
        elif f.name in ("stage", "num_train_epochs", "max_steps", "lora_r", "lora_alpha",
                        "max_length", "save_steps", "seed", "num_workers", "vision_feature_layer",
                        "global_batch_size", "per_device_batch_size"):
            p.add_argument(name, type=int, default=default)
        elif f.name in ("learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm",
                        "lora_dropout"):
            p.add_argument(name, type=float, default=default)
        else:
            p.add_argument(name, type=str, default=default)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m models.train export")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--output", required=True)
        a = p.parse_args(argv[1:])
        print(export_merged(a.checkpoint, a.output))
        return
    args = vars(_parser().parse_args(argv))
    args.pop("local_rank")
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


if __name__ == "__main__":
    warnings.filterwarnings("default")
    main()
