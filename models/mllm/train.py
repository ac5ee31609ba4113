"""LLaVA-style training of an :class:`~models.mllm.model.MLLM` on ``transformers.Trainer``.

Flags follow LLaVA-1.5's ``train.py`` (``--model_name_or_path`` is the LLM, ``--vision_tower``,
``--version`` the conversation template, ``--tune_mm_mlp_adapter`` for stage 1, ``--lora_enable``,
``--mm_projector_lr``, ...) plus every ``transformers.TrainingArguments`` flag; our own are
``--projector`` (registry name), ``--projector_kwargs`` (JSON), ``--stage`` and the resize
policy ``--image_resize fixed|native`` with ``--max_pixels`` (:mod:`models.mllm.data`: native
keeps each image's aspect ratio and size up to ``max_pixels``; records may hold several images
or a video's frames)::

    python -m models.train --stage 1 --model_name_or_path lmsys/vicuna-7b-v1.5 \\
        --vision_tower openai/clip-vit-large-patch14-336 --projector pargo \\
        --data_path blip_558k.json --image_folder images --output_dir runs/stage1 --bf16
    python -m models.train export --checkpoint runs/stage2 --output merged/

``--model_name_or_path`` may also be a LLaVA checkpoint, llava-hf or original layout (as in
LLaVA's own fine-tuning recipe, :mod:`models.mllm.llava`): tower, projector and LLM come from it,
``--vision_tower`` is then optional (original layout: it replaces ``mm_vision_tower``),
``--projector NAME`` swaps in a fresh projector on its tower and LLM, and ``--save_llava DIR``
writes the llava-hf export (LoRA merged) at the end of training (``export --format llava``
does it for a finished run)::

    python -m models.train --stage 2 --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --lora_enable --data_path mine.json --image_folder images --output_dir runs/lora \
        --bf16 --save_llava runs/lora/llava-hf

``--stage 1``: projector only (``--tune_mm_mlp_adapter``), template ``plain``, lr 1e-3.
``--stage 2``: template ``vicuna_v1``; with ``--lora_enable`` LoRA (r 128, alpha 256, lr 2e-4,
projector lr 2e-5, LLaVA-1.5's recipe), without it the whole LLM (lr 2e-5). A flag given
explicitly always wins over these stage defaults. Both: cosine schedule, warmup ratio 0.03,
weight decay 0, AdamW (Trainer's), gradient clipping 1.0, log every step.

Precision (the part Trainer leaves to the model): parameters that train are fp32 master weights
whatever dtype the checkpoint was saved in (an fp16-saved LLM is upcast; AdamW on fp16 weights
NaNs); frozen ones are cast to the compute dtype (bf16 under ``--bf16``, fp16 under ``--fp16``,
else fp32), and ``--bf16`` / ``--fp16`` run the forward under autocast (accelerate). Under
DeepSpeed ZeRO-3 the models are built partitioned (``from_pretrained`` under ``zero.Init``, set
up by ``TrainingArguments(deepspeed=...)``) and DeepSpeed keeps the fp32 master partitions.

Programmatic use: ``train(args, model=None, on_step=None)`` with ``args`` a dict of flags, a
list of CLI strings, or the ``(ModelArguments, DataArguments, TrainingArguments)`` triple; pass
a ready ``MLLM`` as ``model`` (components built in code are then saved under
``<output_dir>/base`` so checkpoints can be rebuilt).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformers

from ..projectors.registry import projector_from_config
from .llava import exportable_projector, is_llava_checkpoint
from .model import MLLM, load_llm, tower_feature_parameters
from .trainer import RUN_CONFIG, TRAINABLE, MLLMTrainer, latest_checkpoint, resolve_resume

STAGE_LR = {1: 1e-3, 2: 2e-5}
LORA_LR, LORA_PROJECTOR_LR = 2e-4, 2e-5
STAGE_TEMPLATE = {1: "plain", 2: "vicuna_v1"}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "the LLM (name or "
                                           "directory; its tokenizer is loaded from there too), "
                                           "or a LLaVA checkpoint (llava-hf or original layout: "
                                           "tower, projector and LLM come from it)"})
    version: str | None = field(default=None, metadata={"help": "conversation template: plain, "
                                "vicuna_v1, llava_llama_2, mistral_instruct, chatml, llama_3, "
                                "chat_template (default: plain at stage 1, vicuna_v1 at 2)"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP / SigLIP name or dir "
                                     "(a LLaVA checkpoint: optional, replaces its "
                                     "mm_vision_tower)"})
    mm_vision_select_layer: int | None = field(default=None, metadata={
        "help": "tower hidden state used (default -2; a LLaVA checkpoint's own)"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (CLS "
                                          "dropped); cls_patch is rejected (see the docs)"})
    projector: str | None = field(default=None, metadata={"help": "projector registry name "
                                  "(default mlp2x_gelu; a LLaVA checkpoint keeps its own unless "
                                  "given)"})
    projector_kwargs: str = field(default="{}", metadata={"help": "JSON dict of projector "
                                  "arguments; {\"init_from_bert\": DIR} loads a BertModel into "
                                  "ParGo / Q-Former (their load_bert)"})
    stage: int | None = field(default=None, metadata={"help": "1 (projector) or 2 (LLM too); "
                              "default: 1 with --tune_mm_mlp_adapter, else 2"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "projector.pt "
                                                "(e.g. stage 1's) to start from"})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "train the tower"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON / JSONL file"})
    image_folder: str | None = None
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (LLaVA-1.5) or crop "
                                    "(--image_resize fixed only)"})
    image_resize: str = field(default="fixed", metadata={"help": "fixed (the tower's square "
                              "size) or native (aspect kept, downscaled to --max_pixels, sides "
                              "rounded to the patch size; needs a packed-batch projector)"})
    max_pixels: int | None = field(default=None, metadata={"help": "--image_resize native: "
                                   "pixel budget per image (default: the tower's image_size^2)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts; "
                                  "records are always tokenised lazily"})
    strict_data: bool = field(default=False, metadata={"help": "raise on bad records instead "
                              "of skipping and reporting them"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "longer sequences are cut"})
    bits: int = field(default=16, metadata={"help": "4 / 8: quantised LLM (bitsandbytes) + LoRA"})
    lora_enable: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    mm_projector_lr: float | None = field(default=None, metadata={
        "help": "projector lr (default: 2e-5 with --lora_enable, else --learning_rate)"})
    save_llava: str | None = field(default=None, metadata={
        "help": "also write a llava-hf directory here at the end of training (LoRA merged; "
                "2-layer MLP projectors only)"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "each batch all "
                                           "image or all text records"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "LLaVA's flag: warmup steps as "
                                "a fraction of the total (used when --warmup_steps is 0)"})
    # LLaVA's defaults where they differ from Trainer's
    lr_scheduler_type: str = "cosine"
    logging_steps: float = 1
    report_to: None | str | list[str] = "none"
    remove_unused_columns: bool = False
    optim: str = "adamw_torch"

    def __post_init__(self):
        if not self.warmup_steps and self.warmup_ratio:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


ARG_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
__all__ = ["ModelArguments", "DataArguments", "TrainingArguments", "parse_args", "build_model",
           "cast_for_training", "train", "load_checkpoint_model", "export_merged", "main",
           "latest_checkpoint", "check_save_llava"]


# ------------------------------------------------------------------------------ argument parsing
def _zero_stage(deepspeed) -> int:
    """ZeRO stage of a ``--deepspeed`` config (a JSON path, a dict or None: 0)."""
    if not deepspeed:
        return 0
    if not isinstance(deepspeed, dict):
        with open(deepspeed) as f:
            deepspeed = json.load(f)
    return int(deepspeed.get("zero_optimization", {}).get("stage", 0))


def check_native_zero3(image_resize: str, deepspeed, world_size: int) -> None:
    """Refuse ``--image_resize native`` under ZeRO-3 on several processes: each micro-batch runs
    the (partitioned) tower once per distinct image size, so ranks would issue different numbers
    of ZeRO-3 parameter gathers and hang or fail with a collective mismatch (a known failure of
    per-batch vision calls under ZeRO-3)."""
    if image_resize == "native" and world_size > 1 and _zero_stage(deepspeed) == 3:
        raise ValueError("--image_resize native is not supported with DeepSpeed ZeRO-3 on more "
                         "than one process (ranks would run the vision tower a different "
                         "number of times per step and deadlock in ZeRO-3's parameter "
                         "gathers); use ZeRO-2, one process, or --image_resize fixed")


def check_save_llava(save_llava, deepspeed) -> None:
    """Refuse ``--save_llava`` under ZeRO-3: the export rebuilds the model from the saved run in
    the training process, where transformers would load it partitioned again; run ``export
    --format llava`` after training instead."""
    if save_llava and _zero_stage(deepspeed) == 3:
        raise ValueError("--save_llava is not supported with DeepSpeed ZeRO-3 (the export would "
                         "load the model partitioned); run `python -m models.train export "
                         "--checkpoint OUTPUT_DIR --output DIR --format llava` after training")


def parse_args(args) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """``args``: CLI strings, a dict of flags, or the dataclass triple; the stage defaults
    (module docstring) fill what was not given explicitly."""
    parser = transformers.HfArgumentParser(ARG_CLASSES)
    if isinstance(args, (list, tuple)) and len(args) == 3 and all(
            isinstance(a, c) for a, c in zip(args, ARG_CLASSES)):
        margs, dargs, targs = args
        given = {f.name for a in args for f in fields(a)
                 if f.default is not MISSING and getattr(a, f.name) != f.default}
    elif isinstance(args, dict):
        names = {f for c in ARG_CLASSES for f in c.__dataclass_fields__}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown training options: {unknown}")
        kw = {k: (json.dumps(v) if k == "projector_kwargs" and isinstance(v, dict) else v)
              for k, v in args.items()}
        margs, dargs, targs = parser.parse_dict(kw)
        given = set(args)
    elif isinstance(args, (list, tuple)):
        margs, dargs, targs = parser.parse_args_into_dataclasses(args=list(args))
        given = {a[2:].split("=")[0] for a in args if isinstance(a, str) and a.startswith("--")}
    else:
        raise TypeError(f"args must be a dict, a list of CLI strings or the argument "
                        f"dataclasses, got {type(args).__name__}")
    _apply_stage_defaults(margs, targs, given)
    if dargs.data_path is None:
        raise ValueError("data_path is required")
    if dargs.image_aspect_ratio not in ("pad", "crop"):
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got "
                         f"{dargs.image_aspect_ratio!r}")
    if dargs.image_resize not in ("fixed", "native"):
        raise ValueError(f"image_resize must be 'fixed' or 'native', got {dargs.image_resize!r}")
    if dargs.image_resize == "native" and "image_aspect_ratio" in given:
        raise ValueError("image_aspect_ratio applies to --image_resize fixed only (native keeps "
                         "the aspect ratio)")
    if dargs.max_pixels is not None and (dargs.image_resize != "native"
                                         or dargs.max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int and goes with --image_resize "
                         f"native, got {dargs.max_pixels} with {dargs.image_resize!r}")
    check_native_zero3(dargs.image_resize, targs.deepspeed,
                       int(os.environ.get("WORLD_SIZE", "1")))
    check_save_llava(targs.save_llava, targs.deepspeed)
    projector_kwargs(margs)
    if margs.mm_vision_select_feature != "patch":
        raise ValueError(f"mm_vision_select_feature must be 'patch' (the projectors take the "
                         f"patch grid; a CLS token has no grid cell), got "
                         f"{margs.mm_vision_select_feature!r}")
    if targs.bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {targs.bits}")
    return margs, dargs, targs


def projector_kwargs(margs) -> dict:
    """``--projector_kwargs`` parsed: a JSON object, else ``ValueError`` naming the flag."""
    try:
        kwargs = json.loads(margs.projector_kwargs)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"--projector_kwargs must be a JSON object, got "
                         f"{margs.projector_kwargs!r} ({e})") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f"--projector_kwargs must be a JSON object, got "
                         f"{margs.projector_kwargs!r}")
    return kwargs


def _apply_stage_defaults(margs, targs, given: set) -> None:
    if margs.stage is None:
        margs.stage = 1 if margs.tune_mm_mlp_adapter else 2
    if margs.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {margs.stage}")
    if margs.stage == 1 and "tune_mm_mlp_adapter" not in given:
        margs.tune_mm_mlp_adapter = True
    if margs.tune_mm_mlp_adapter and targs.lora_enable:
        raise ValueError("tune_mm_mlp_adapter (stage 1) trains the projector only; drop "
                         "lora_enable")
    if margs.version is None:
        margs.version = STAGE_TEMPLATE[margs.stage]
    if "learning_rate" not in given:
        targs.learning_rate = LORA_LR if targs.lora_enable else STAGE_LR[margs.stage]
    if targs.lora_enable and "mm_projector_lr" not in given:
        targs.mm_projector_lr = LORA_PROJECTOR_LR


# ---------------------------------------------------------------------------------- model setup
def compute_dtype(targs) -> torch.dtype:
    return torch.bfloat16 if targs.bf16 else torch.float16 if targs.fp16 else torch.float32


def _llm_kwargs(targs) -> dict:
    if targs.bits == 16:
        return {}
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--bits {targs.bits} needs bitsandbytes, which is not installed "
                         f"(pip install bitsandbytes; CUDA only)")
    if not targs.lora_enable:
        raise ValueError(f"--bits {targs.bits} quantises the LLM: only LoRA adapters can train "
                         f"on it, add --lora_enable")
    return {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=targs.bits == 4, load_in_8bit=targs.bits == 8,
        bnb_4bit_compute_dtype=compute_dtype(targs), bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head"])}


def build_model(margs, targs, model: MLLM | None = None) -> MLLM:
    """The MLLM of the flags (or ``model``) with the stage's trainable parameters and dtypes."""
    proj_kwargs = projector_kwargs(margs)
    bert = proj_kwargs.pop("init_from_bert", None)
    if model is None and margs.model_name_or_path is not None \
            and is_llava_checkpoint(margs.model_name_or_path):
        if targs.bits != 16:
            raise ValueError("--bits 4 / 8 with a LLaVA checkpoint is not supported (only the "
                             "LLM would be quantised; not implemented)")
        model = MLLM.from_llava(margs.model_name_or_path, projector=margs.projector,
                                projector_kwargs=proj_kwargs or None,
                                vision_tower=margs.vision_tower, torch_dtype=torch.float32,
                                vision_feature_layer=margs.mm_vision_select_layer)
    elif model is None:
        if margs.model_name_or_path is None or margs.vision_tower is None:
            raise ValueError("model_name_or_path and vision_tower are required (or pass model=)")
        # fp32 load: the trainable weights start as the exact checkpoint values (fp32 masters);
        # the frozen ones are cast down below
        model = MLLM.build(margs.vision_tower, margs.model_name_or_path,
                           margs.projector or "mlp2x_gelu",
                           image_processor=_processor_default(margs.vision_tower),
                           projector_kwargs=proj_kwargs, dtype=torch.float32,
                           vision_feature_layer=-2 if margs.mm_vision_select_layer is None
                           else margs.mm_vision_select_layer,
                           llm_kwargs=_llm_kwargs(targs))
    elif not isinstance(model, MLLM):
        raise TypeError(f"model must be an MLLM, got {type(model).__name__}")
    if targs.save_llava:  # refused now rather than after training
        exportable_projector(model.projector)
    if bert is not None:
        if not hasattr(model.projector, "load_bert"):
            raise ValueError(f"init_from_bert: projector "
                             f"{model.projector.config.get('name')!r} has no load_bert")
        model.projector.load_bert(transformers.BertModel.from_pretrained(str(bert)))
    if margs.pretrain_mm_mlp_adapter:
        model.projector.load_state_dict(torch.load(margs.pretrain_mm_mlp_adapter,
                                                   map_location="cpu"))
    model.set_vision_tower_trainable(margs.unfreeze_mm_vision_tower)
    model.llm.requires_grad_(False)
    model.projector.requires_grad_(True)
    if margs.stage == 2:
        if targs.lora_enable:
            if targs.bits != 16:
                from peft import prepare_model_for_kbit_training
                model.llm = prepare_model_for_kbit_training(
                    model.llm, use_gradient_checkpointing=targs.gradient_checkpointing)
            model.apply_lora(targs.lora_r, targs.lora_alpha, targs.lora_dropout)
        else:
            model.llm.requires_grad_(True)
    from transformers.integrations import is_deepspeed_zero3_enabled
    if not is_deepspeed_zero3_enabled():  # under ZeRO-3 DeepSpeed owns the dtypes
        cast_for_training(model, compute_dtype(targs))
    return model


def cast_for_training(model: torch.nn.Module, frozen_dtype: torch.dtype) -> None:
    """Trainable floating parameters -> fp32 (master weights), frozen ones -> ``frozen_dtype``."""
    for p in model.parameters():
        if p.is_floating_point():
            want = torch.float32 if p.requires_grad else frozen_dtype
            if p.dtype != want:
                p.data = p.data.to(want)


def _processor_default(vision_tower):
    """The tower's own image processor when it has one, else None (built from its config)."""
    p = Path(vision_tower)
    if not p.exists() or (p / "preprocessor_config.json").is_file():
        return str(vision_tower)
    return None


def _save_components(model: MLLM, margs, out: Path) -> dict:
    """Specs (strings) from which the base model can be rebuilt; components given as objects
    are saved under ``out/base`` (an LLM grown by ``<image>`` is rebuilt exactly from its path:
    :func:`~models.mllm.model.ensure_image_token`), as are the tokenizer and image processor."""
    base = out / "base"
    llm = model.llm.get_base_model() if model.is_lora else model.llm
    if margs.model_name_or_path is not None and is_llava_checkpoint(margs.model_name_or_path):
        # rebuilt by MLLM.from_llava (deterministic: <image> added the same way)
        specs = {"llava": margs.model_name_or_path, "vision_tower": margs.vision_tower}
        for name, obj in (("tokenizer", model.tokenizer),
                          ("image_processor", model.image_processor)):
            specs[name] = str(base / name)
            obj.save_pretrained(specs[name])
        return specs
    specs = {"vision_tower": margs.vision_tower, "llm": margs.model_name_or_path}
    from transformers.integrations import is_deepspeed_zero3_enabled
    if None in specs.values() and is_deepspeed_zero3_enabled():
        raise ValueError("under ZeRO-3 give the vision tower and the LLM as paths "
                         "(model_name_or_path, vision_tower): partitioned modules passed as "
                         "objects cannot be saved whole")
    for name, obj in (("vision_tower", model.vision_tower), ("llm", llm)):
        if specs[name] is None:
            specs[name] = str(base / name)
            obj.save_pretrained(specs[name])
    specs["tokenizer"] = str(base / "tokenizer")
    model.tokenizer.save_pretrained(specs["tokenizer"])
    specs["image_processor"] = str(base / "image_processor")
    model.image_processor.save_pretrained(specs["image_processor"])
    return specs


class _OnStep(transformers.TrainerCallback):
    """Calls ``fn(record)`` with each logged step: ``step``, ``loss``, ``lr``, ``grad_norm``,
    ``time`` (seconds since the start)."""

    def __init__(self, fn):
        self.fn, self.t0 = fn, time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            self.fn({"step": state.global_step, "loss": logs["loss"],
                     "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                     "time": time.time() - self.t0})


# --------------------------------------------------------------------------------------- train
def train(args, *, model: MLLM | None = None, on_step=None) -> dict:
    """Train per ``args`` (see the module docstring). ``on_step(record)`` is called on the main
    process with each logged step.

    Returns ``{"step", "loss", "losses", "samples_per_s", "train_runtime", "bad_records",
    "checkpoint", "output_dir"}``: ``losses`` lists the logged loss of every step run by this
    call, in order (one per step: ``logging_steps`` defaults to 1); ``checkpoint`` is the
    output directory holding the final weights (``trainable.pt``, ``projector.pt``,
    ``adapter/`` or ``llm/``, ``run_config.json``).
    """
    margs, dargs, targs = parse_args(args)
    transformers.set_seed(targs.seed)
    model = build_model(margs, targs, model)
    from .data import Collator, LLaVADataset
    if dargs.image_resize == "native":
        model.packed_tokens_for_grid(model.visual_grid)  # refuses an unpacked projector now
        side = int(model.vision_tower.config.image_size)
        resize = dict(image_resize="native", max_pixels=dargs.max_pixels or side * side,
                      patch_size=model.patch_size, tokens_for_grid=model.packed_tokens_for_grid)
    else:
        resize = dict(image_aspect_ratio=dargs.image_aspect_ratio)
        model.image_aspect_ratio = dargs.image_aspect_ratio  # chat / eval / export: the same
    dataset = LLaVADataset(dargs.data_path, dargs.image_folder, model.tokenizer,
                           model.image_processor, image_token_id=model.image_token_id,
                           num_image_tokens=model.num_visual_tokens, template=margs.version,
                           max_length=targs.model_max_length, strict=dargs.strict_data, **resize)
    out = Path(targs.output_dir)
    resume = resolve_resume(out, targs.resume_from_checkpoint)  # verified against its manifest
    specs_file = out / "base" / "components.json"
    if targs.should_save:
        out.mkdir(parents=True, exist_ok=True)
        if resume is not None and specs_file.is_file():
            specs = json.loads(specs_file.read_text())
        else:
            specs = _save_components(model, margs, out)
            specs_file.write_text(json.dumps(specs, indent=2))
    else:
        specs = None
    run_config = {"components": specs, "mllm": model.config_dict(), "stage": margs.stage,
                  "lora": ({"r": targs.lora_r, "alpha": targs.lora_alpha,
                            "dropout": targs.lora_dropout} if targs.lora_enable else None),
                  "model_args": asdict(margs), "data_args": asdict(dargs)}
    trainer = MLLMTrainer(model=model, args=targs, train_dataset=dataset,
                          data_collator=Collator(model.tokenizer.pad_token_id, "right"),
                          callbacks=[_OnStep(on_step)] if on_step else None,
                          run_config=run_config)
    n_logged = len(trainer.state.log_history)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))
    trainer.save_state()
    if targs.save_llava and targs.should_save:  # rebuilt from the saved run (ZeRO-3 safe)
        export_merged(out, targs.save_llava, fmt="llava",
                      dtype=str(compute_dtype(targs)).removeprefix("torch."))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history[n_logged:] if "loss" in h and "step" in h]
    if resume is not None:  # the history restored from the checkpoint precedes this call's
        start = int(Path(resume).name.split("-")[-1])
        losses = [h["loss"] for h in history if "loss" in h and h.get("step", 0) > start]
    return {"step": trainer.state.global_step, "loss": losses[-1] if losses else None,
            "losses": losses, "samples_per_s": result.metrics.get("train_samples_per_second"),
            "train_runtime": result.metrics.get("train_runtime"),
            "bad_records": len(dataset.bad_records), "checkpoint": str(out),
            "output_dir": str(out)}


# -------------------------------------------------------------------------------------- export
def load_checkpoint_model(checkpoint, torch_dtype=torch.float32) -> MLLM:
    """The MLLM of a training output / checkpoint directory (base components + projector +
    adapter or trained LLM), in ``torch_dtype`` (None: as saved)."""
    ck = Path(checkpoint)
    if not (ck / RUN_CONFIG).is_file():
        raise ValueError(f"checkpoint {str(ck)!r} has no {RUN_CONFIG}")
    with open(ck / RUN_CONFIG) as f:
        rc = json.load(f)
    comp, mc = rc["components"], rc["mllm"]
    # runs before image_aspect_ratio was in the model config: the run's data flag
    aspect = mc.get("image_aspect_ratio") or rc.get("data_args", {}).get("image_aspect_ratio",
                                                                          "pad")
    if comp.get("llava") is not None:
        base = MLLM.from_llava(comp["llava"], vision_tower=comp.get("vision_tower"),
                               torch_dtype=torch_dtype)
        llm = (load_llm(ck / "llm", dtype=torch_dtype) if (ck / "llm").is_dir()
               else base.llm)
        model = MLLM(base.vision_tower, projector_from_config(mc["projector"]), llm,
                     base.image_token_id, vision_feature_layer=mc["vision_feature_layer"],
                     vision_select_feature=mc.get("vision_select_feature", "patch"),
                     tokenizer=base.tokenizer, image_processor=base.image_processor,
                     image_aspect_ratio=aspect)
        if torch_dtype is not None:
            model.projector.to(torch_dtype)
    else:
        llm = str(ck / "llm") if (ck / "llm").is_dir() else comp["llm"]
        model = MLLM.build(comp["vision_tower"], llm, mc["projector"],
                           tokenizer=comp["tokenizer"], image_processor=comp["image_processor"],
                           vision_feature_layer=mc["vision_feature_layer"],
                           vision_select_feature=mc.get("vision_select_feature", "patch"),
                           dtype=torch_dtype, image_aspect_ratio=aspect)
    model.projector.load_state_dict(torch.load(ck / "projector.pt", map_location="cpu"))
    if rc.get("model_args", {}).get("unfreeze_mm_vision_tower"):  # the trained tower
        tower = {k[len("vision_tower."):]: v for k, v in torch.load(
            ck / TRAINABLE, map_location="cpu").items() if k.startswith("vision_tower.")}
        own = model.vision_tower.state_dict()
        # what trained: the part feeding the features (older runs saved the whole tower)
        trained = set(tower_feature_parameters(model.vision_tower, model.vision_feature_layer))
        if not trained <= set(tower) <= set(own):
            raise ValueError(f"checkpoint {str(ck)!r} was trained with "
                             f"unfreeze_mm_vision_tower but its {TRAINABLE} does not hold the "
                             f"tower's parameters")
        model.vision_tower.load_state_dict({**own, **{
            k: v.to(own[k].dtype) for k, v in tower.items()}}, strict=True)
    if (ck / "adapter").is_dir():
        model.load_lora(ck / "adapter")
    return model


def export_merged(checkpoint, output, dtype: str = "float32", fmt: str = "mllm",
                  template: str | None = None) -> Path:
    """Write the model of a run with LoRA merged into the LLM (merged in fp32, then saved in
    ``dtype``). ``fmt="mllm"``: a self-contained MLLM directory
    (``AutoModelForCausalLM.from_pretrained(output)`` loads the LLM, ``MLLM.from_pretrained``
    the whole model); ``fmt="llava"``: a llava-hf directory (``LlavaForConditionalGeneration``
    / ``AutoProcessor``; 2-layer MLP projectors only) whose chat template is ``template``
    (default: the run's ``--version``) and whose image processor pads to a square or not as
    the run's ``--image_aspect_ratio`` did (the model's ``image_aspect_ratio``, so serving
    sees the images as training did). A tower trained with ``--unfreeze_mm_vision_tower`` is
    exported with its trained weights."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if fmt not in ("mllm", "llava"):
        raise ValueError(f"fmt must be 'mllm' or 'llava', got {fmt!r}")
    model = load_checkpoint_model(checkpoint, torch_dtype=torch.float32)
    if fmt == "llava":
        exportable_projector(model.projector)  # before the merge
    if model.is_lora:
        model.merge_lora()
    model.to(getattr(torch, dtype))
    if fmt == "llava":
        with open(Path(checkpoint) / RUN_CONFIG) as f:
            rc = json.load(f)
        if template is None:
            template = rc.get("model_args", {}).get("version") or "vicuna_v1"
        data_args = rc.get("data_args", {})
        if data_args.get("image_resize", "fixed") == "native":
            warnings.warn("the run was trained with --image_resize native; the llava-hf export "
                          "serves images at the tower's fixed size")
        model.save_llava(output, template=template)
    else:
        model.save_pretrained(output)
    return Path(output)


# ----------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        import argparse
        p = argparse.ArgumentParser(prog="python -m models.train export")
        p.add_argument("--checkpoint", required=True, help="training output or checkpoint dir")
        p.add_argument("--output", required=True)
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        p.add_argument("--format", default="mllm", choices=("mllm", "llava"),
                       help="mllm: MLLM.from_pretrained's directory; llava: llava-hf "
                            "(LlavaForConditionalGeneration + AutoProcessor)")
        p.add_argument("--template", default=None, help="--format llava: the chat template "
                       "(default: the run's --version)")
        a = p.parse_args(argv[1:])
        print(export_merged(a.checkpoint, a.output, a.dtype, a.format, a.template))
        return
    if any(a in ("-h", "--help") for a in argv):
        transformers.HfArgumentParser(ARG_CLASSES).parse_args_into_dataclasses(args=argv)
    result = train(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
