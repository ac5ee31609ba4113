"""LLaVA checkpoints in and out of :class:`~models.mllm.model.MLLM`.

Two layouts are read (:func:`load_llava`, ``MLLM.from_llava``):

- **llava-hf** (``LlavaForConditionalGeneration``, ``config.json`` with ``model_type: "llava"``
  and ``text_config`` / ``vision_config``): tower, projector (``multi_modal_projector.linear_1``,
  act, ``linear_2``) and LLM in one directory, with the tokenizer (whose ``<image>`` IS a
  vocabulary entry, ``image_token_index``) and the image processor. Both weight layouts load:
  the one transformers 4.x (< 4.52) and 5.x ``save_pretrained`` write (``language_model.model.*``,
  ``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``) and the module
  names of 4.52+ (``model.language_model.*``, ``lm_head``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``): transformers' own ``from_pretrained`` maps both.
  ``vision_feature_layer`` (an int, or a list: hidden states concatenated),
  ``vision_feature_select_strategy`` (``"default"`` drops the tower's first token, ``"full"``
  keeps every token), ``projector_hidden_act`` and ``multimodal_projector_bias`` are honoured.
- **original LLaVA** (haotian-liu/LLaVA: ``LlavaLlamaForCausalLM``; ``model_type`` ``"llava"`` in
  the released LLaVA-1.5 configs, ``"llava_llama"`` in later code, ``"llava_mistral"``): a causal
  LM directory whose ``config.json`` adds ``mm_vision_tower`` (a name or a path),
  ``mm_projector_type`` (``linear``, ``mlp{N}x_gelu``, ``identity``), ``mm_vision_select_layer``,
  ``mm_vision_select_feature`` (``patch`` / ``cls_patch``), ``mm_hidden_size``,
  ``image_aspect_ratio``, and whose weight shards hold ``model.mm_projector.*``. LLaVA's image
  token there is ``IMAGE_TOKEN_INDEX = -200``, spliced in by its model code and not in the
  vocabulary; here ``<image>`` is added to the tokenizer (after ``<im_patch>`` when
  ``mm_use_im_patch_token``, as LLaVA's loader adds that one) and the LLM's embeddings and head
  grow by one row each, set to the mean of the old rows (:func:`~models.mllm.model.
  ensure_image_token`). The image rows of the embeddings are never read (the projector output
  replaces them); the head's new row adds one logit column, so the vocabulary is one larger than
  the checkpoint's. An export (:func:`save_llava`) keeps that ``<image>`` as its vocabulary
  entry, as llava-hf's own conversion does (which also pads the vocabulary to 32064 and adds a
  ``<pad>``: an exported Vicuna-based model has 32001 entries instead). ``image_aspect_ratio:
  "pad"`` (LLaVA's ``expand2square`` with the image processor's mean colour, as ints) becomes
  the model's ``image_aspect_ratio`` (``"crop"`` otherwise; a llava-hf checkpoint: ``"pad"``
  iff its image processor pads), which ``MLLM.preprocess_images`` / ``chat`` apply, the
  trainer's ``--image_aspect_ratio`` overrides, and an export keeps (its processor is then a
  ``LlavaImageProcessor(do_pad=True)`` with the tower's processor settings). The image
  processor itself is the tower's, unchanged. The tower is loaded from
  ``mm_vision_tower`` (or ``vision_tower=``), as LLaVA does; only with
  ``unfreeze_mm_vision_tower`` are the tower weights in the shards used (as LLaVA's loader).

Refused, each naming the field: ``mm_use_im_start_end`` (image start / end tokens),
``image_aspect_ratio: "anyres..."`` / ``mm_patch_merge_type`` other than ``flat`` / LLaVA-NeXT
model types (tiling), ``s2`` towers, an unknown ``mm_projector_type`` or
``vision_feature_select_strategy``, a tower that cannot be loaded, LoRA checkpoints (merge
them first), quantised loading.

:func:`save_llava` writes a llava-hf directory for 2-layer MLP projectors (the only ones the
format holds): weights, ``config.json``, ``generation_config.json``, and a ``LlavaProcessor``
(image processor, tokenizer, ``patch_size``, ``vision_feature_select_strategy``,
``num_additional_image_tokens``, a chat template rendering the conversation template the model
was trained with). The processor pads images to a square iff the model's
``image_aspect_ratio`` is ``"pad"``; the chat template renders each image as ``<image>\\n`` or,
where a SentencePiece tokenizer needs it to reproduce the training ids, ``<image> \\n``
(:func:`save_llava`).
"""
from __future__ import annotations

import copy
import json
import os
import re
import string
import warnings
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..projectors.mlp import MLPProjector
from ..projectors.registry import build_projector
from .conversation import IMAGE_PLACEHOLDER, get_template
from .model import (check_feature_layer, default_image_processor, ensure_image_token,
                    load_vision_tower, resolve_projector, vision_grid_of)

IMAGE_TOKEN_INDEX = -200  # original LLaVA's image token: spliced in by its model, not in the vocab
IM_PATCH = "<im_patch>"  # LLaVA's DEFAULT_IMAGE_PATCH_TOKEN (added when mm_use_im_patch_token)
LLAVA_HF, ORIGINAL = "llava-hf", "original"
# original-layout LLaVA model types -> the LLM's model type
ORIGINAL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# transformers model types of LLaVA variants this module does not read
UNSUPPORTED_TYPES = {"llava_next": "LLaVA-NeXT (anyres tiling)",
                     "llava_next_video": "LLaVA-NeXT-Video (anyres tiling)",
                     "llava_onevision": "LLaVA-OneVision (anyres tiling)",
                     "vipllava": "ViP-LLaVA", "video_llava": "Video-LLaVA",
                     "llava_qwen": "LLaVA-NeXT / OneVision (original layout, anyres)"}
# config keys of the original layout that are not the LLM's (dropped from its config)
_LLAVA_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
               "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
               "use_mm_proj", "unfreeze_mm_vision_tower", "tune_mm_vision_resampler",
               "freeze_mm_vision_resampler", "s2", "s2_scales", "architectures",
               "model_type", "transformers_version", "_name_or_path", "vision_tower",
               "image_crop_resolution", "image_split_resolution", "mm_resampler_type"}
EXPORTABLE = ("a 2-layer MLP (Linear, activation, Linear): 'mlp2x_gelu', or 'mlp' with "
              "depth=2")


# ------------------------------------------------------------------------------------ configs
def _local_dir(path) -> Path:
    """``path`` as a local directory: a Hub name is downloaded (config, tokenizer, weights)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise ValueError(f"LLaVA checkpoint {str(path)!r} is not a directory or a Hub name")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path), allow_patterns=[
        "*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))


def read_config(path) -> dict:
    """``config.json`` of a directory or a Hub name, as a plain dict (not through
    ``AutoConfig``: the original LLaVA-1.5 configs say ``model_type: "llava"``, which
    transformers reads as its own, different, llava-hf config)."""
    p = Path(path)
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{str(p)!r} has no config.json")
    else:
        from transformers.utils import cached_file
        f = cached_file(str(path), "config.json")
    with open(f) as fh:
        return json.load(fh)


def llava_layout(config: dict) -> str | None:
    """``"llava-hf"``, ``"original"`` or None (not a LLaVA checkpoint) for a ``config.json``
    dict; ``ValueError`` for LLaVA variants that are not read here (LLaVA-NeXT, ...)."""
    mt = config.get("model_type")
    if mt in UNSUPPORTED_TYPES:
        raise ValueError(f"model_type {mt!r} ({UNSUPPORTED_TYPES[mt]}) is not supported: only "
                         f"LLaVA-1.5-style checkpoints (one fixed-size image per <image>) load; "
                         f"see the README")
    if "mm_vision_tower" in config or (mt in ORIGINAL_TYPES and mt != "llava"):
        return ORIGINAL
    if mt == "llava" and "text_config" in config and "vision_config" in config:
        return LLAVA_HF
    return None


def is_llava_checkpoint(path) -> bool:
    """True when ``path`` (a directory or a Hub name) is a LLaVA checkpoint of either layout
    (False when it has no ``config.json``; ``ValueError`` for the LLaVA variants not read
    here, rather than a confusing failure as some other model)."""
    try:
        cfg = read_config(path)
    except OSError:
        return False
    return llava_layout(cfg) is not None


def padding_processor(processor, pad: bool):
    """``processor`` (a transformers image processor) padding images to a square with its mean
    colour before its resize (LLaVA's ``image_aspect_ratio: "pad"``) when ``pad``, or not:
    a ``LlavaImageProcessor`` with ``do_pad`` and the processor's other settings; returned as
    is when it already does what is asked."""
    import transformers as tf
    if bool(getattr(processor, "do_pad", False)) == pad:
        return processor
    d = processor.to_dict()
    d.setdefault("do_center_crop", False)  # the Llava class default is True (SigLIP has none)
    d.update(do_pad=pad, image_processor_type="LlavaImageProcessor")
    return tf.LlavaImageProcessor.from_dict(d)


# ---------------------------------------------------------------------------------- loading
@dataclass
class _Parts:
    """What a layout reader returns: components, the checkpoint's feature settings and its
    projector (registry name, config, state dict)."""
    tower: nn.Module
    llm: nn.Module
    tokenizer: object
    image_processor: object
    image_token_id: int
    feature_layer: int | list[int]
    select_feature: str
    proj_name: str
    proj_config: dict = field(default_factory=dict)
    proj_state: dict = field(default_factory=dict)
    image_aspect_ratio: str = "crop"


def _tower_has_cls(tower: nn.Module) -> bool:
    """Whether the tower's hidden states start with a CLS token (CLIP: yes; SigLIP: no)."""
    emb = getattr(tower, "embeddings", None)
    if emb is None:  # transformers 4.x CLIPVisionModel: under .vision_model
        emb = getattr(getattr(tower, "vision_model", None), "embeddings", None)
    return any(hasattr(emb, a) for a in ("class_embedding", "cls_token"))


def _check_select(select: str, has_cls: bool, field_name: str) -> None:
    if select == "cls_patch" and not has_cls:
        raise ValueError(f"{field_name}: the vision tower has no CLS token to keep")


def _causal_lm(text_config, base: nn.Module, head: nn.Module, generation_config) -> nn.Module:
    """A causal LM of ``text_config`` made of the given backbone and head modules (shared, not
    copied): the LLM half of a loaded ``LlavaForConditionalGeneration``. The shell is built on
    the meta device, so nothing is allocated twice."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    lm_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    with torch.device("meta"):
        lm = lm_cls(text_config)
    setattr(lm, lm.base_model_prefix, base)
    lm.set_output_embeddings(head)
    left = [n for n, t in chain(lm.named_parameters(), lm.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{lm_cls.__name__} has parts the llava checkpoint did not fill: "
                           f"{left[:5]}")
    lm.generation_config = copy.deepcopy(generation_config) if generation_config is not None \
        else tf.GenerationConfig.from_model_config(text_config)
    return lm


def _read_hf(path, torch_dtype, vision_tower) -> _Parts:
    import transformers as tf
    if vision_tower is not None:
        raise ValueError("vision_tower: a llava-hf checkpoint holds its own tower (its "
                         "vision_config and weights); leave vision_tower unset")
    full = tf.LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype)
    cfg = full.config
    tower = full.model.vision_tower
    llm = _causal_lm(cfg.text_config, full.model.language_model, full.lm_head,
                     getattr(full, "generation_config", None))
    has_cls = _tower_has_cls(tower)
    strategy = cfg.vision_feature_select_strategy
    if strategy == "default":
        if not has_cls:
            raise ValueError("vision_feature_select_strategy 'default' drops the tower's first "
                             "token, but this tower has no CLS token (it would drop a patch)")
        select = "patch"
    elif strategy == "full":
        select = "cls_patch" if has_cls else "patch"
    else:
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got "
                         f"{strategy!r}")
    from ..projectors.mlp import ACTIVATIONS
    act = cfg.projector_hidden_act
    if act not in ACTIVATIONS:
        raise ValueError(f"projector_hidden_act {act!r} is not supported (one of "
                         f"{sorted(ACTIVATIONS)})")
    src = full.model.multi_modal_projector
    state = {"mlp.0.weight": src.linear_1.weight, "mlp.2.weight": src.linear_2.weight}
    bias = bool(cfg.multimodal_projector_bias)
    if bias:
        state.update({"mlp.0.bias": src.linear_1.bias, "mlp.2.bias": src.linear_2.bias})
    plain = bias and act == "gelu" and select == "patch"
    tok = tf.AutoTokenizer.from_pretrained(str(path))
    proc = tf.AutoImageProcessor.from_pretrained(str(path))
    return _Parts(tower, llm, tok, proc, int(cfg.image_token_id), cfg.vision_feature_layer,
                  select, "mlp2x_gelu" if plain else "mlp",
                  {} if plain else dict(depth=2, bias=bias, act=act,
                                        cls_token=select == "cls_patch"),
                  {k: v.detach() for k, v in state.items()},
                  "pad" if getattr(proc, "do_pad", None) else "crop")


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory (index-listed shards or a single file)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            with open(path / index) as f:
                return sorted({path / v for v in json.load(f)["weight_map"].values()})
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise ValueError(f"{str(path)!r} holds no weights (model.safetensors, pytorch_model.bin or "
                     f"their sharded index)")


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose name starts with ``prefix`` (prefix stripped), read
    alone from the shards (safetensors) or from mmap'ed ``.bin`` shards."""
    out = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k.startswith(prefix):
                        out[k[len(prefix):]] = st.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            out.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def _original_projector(ptype, select: str, vision_width: int, llm_width: int,
                        weights: dict) -> tuple[str, dict, dict]:
    """(registry name, config, state dict) of LLaVA's ``mm_projector`` of type ``ptype``."""
    if ptype == "linear":
        depth = 1
        state = {f"mlp.0.{k}": v for k, v in weights.items()}
    elif ptype == "identity":
        depth, state = 0, {}
        if vision_width != llm_width:
            raise ValueError(f"mm_projector_type 'identity' needs mm_hidden_size == hidden_size, "
                             f"got {vision_width} and {llm_width}")
    else:
        m = re.fullmatch(r"mlp(\d+)x_gelu", str(ptype))
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"mm_projector_type {ptype!r} is not supported (linear, "
                             f"mlp<N>x_gelu, identity)")
        depth = int(m.group(1))
        state = {f"mlp.{k}": v for k, v in weights.items()}
    want = {f"mlp.{2 * i}.{w}" for i in range(depth) for w in ("weight", "bias")}
    if set(state) != want:
        raise ValueError(f"mm_projector_type {ptype!r}: the checkpoint's model.mm_projector.* "
                         f"tensors {sorted(weights)} are not those of that projector")
    if select == "patch" and ptype in ("linear", "mlp2x_gelu"):
        return ptype, {}, state
    return "mlp", dict(depth=depth, cls_token=select == "cls_patch"), state


def _read_original(path, cfg: dict, torch_dtype, vision_tower, keep_projector: bool) -> _Parts:
    """The parts of an original-layout checkpoint; ``keep_projector`` False: its projector is
    replaced, so its type, width (``mm_hidden_size``) and weights are not read."""
    import transformers as tf
    for key, what in (("mm_use_im_start_end", "image start / end tokens around the image"),
                      ("s2", "multi-scale (S2) vision towers")):
        if cfg.get(key):
            raise ValueError(f"{key}: {what} are not supported")
    aspect = cfg.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ValueError(f"image_aspect_ratio {aspect!r}: anyres tiling (LLaVA-NeXT) is not "
                         f"supported")
    if cfg.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"mm_patch_merge_type {cfg['mm_patch_merge_type']!r}: only 'flat' "
                         f"(LLaVA-1.5) is supported (spatial merges are LLaVA-NeXT's)")
    mt = cfg.get("model_type")
    if mt not in ORIGINAL_TYPES:
        raise ValueError(f"model_type {mt!r}: original-layout LLaVA checkpoints of "
                         f"{sorted(ORIGINAL_TYPES)} are supported")
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got "
                         f"{select!r}")
    ptype = cfg.get("mm_projector_type", "linear")  # LLaVA's default
    if keep_projector and not (ptype in ("linear", "identity") or re.fullmatch(r"mlp([1-9]\d*)x_gelu", str(ptype))):
        raise ValueError(f"mm_projector_type {ptype!r} is not supported (linear, mlp<N>x_gelu, "
                         f"identity)")
    # the tower: by name or path, as LLaVA (its shard weights only when it was trained)
    spec = vision_tower if vision_tower is not None else cfg.get("mm_vision_tower")
    if spec is None:
        raise ValueError("mm_vision_tower is missing from config.json; pass vision_tower=")
    try:
        tower = load_vision_tower(spec, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"mm_vision_tower {str(spec)!r} cannot be loaded ({type(e).__name__}: "
                         f"{e}); pass vision_tower= (--vision_tower) with a local copy of that "
                         f"tower") from e
    if cfg.get("unfreeze_mm_vision_tower"):
        sd = read_tensors(path, "model.vision_tower.vision_tower.")
        if not sd:
            raise ValueError("unfreeze_mm_vision_tower is set but the shards hold no "
                             "model.vision_tower.vision_tower.* weights")
        # transformers 4.x saved CLIPVisionModel under vision_model.*; 5.x has no such level
        own = set(tower.state_dict())
        sd = {(k[len("vision_model."):] if k.startswith("vision_model.")
               and k not in own else k): v for k, v in sd.items()}
        tower.load_state_dict(sd, strict=True)
    layer = cfg.get("mm_vision_select_layer", -2)
    layer = check_feature_layer(layer, tower.config.num_hidden_layers)
    _check_select(select, _tower_has_cls(tower), "mm_vision_select_feature 'cls_patch'")
    mm_hidden = cfg.get("mm_hidden_size")
    if keep_projector and mm_hidden is not None and mm_hidden != tower.config.hidden_size:
        raise ValueError(f"mm_hidden_size {mm_hidden} does not match the vision tower's width "
                         f"{tower.config.hidden_size} (mm_vision_tower {str(spec)!r})")
    # the image processor: the tower's (as LLaVA); pad to square is the model's policy
    proc = None
    if isinstance(spec, (str, os.PathLike)):
        try:
            proc = tf.AutoImageProcessor.from_pretrained(str(spec))
        except (OSError, ValueError):
            proc = None
    if proc is None:
        proc = default_image_processor(tower.config)
    # the LLM: the causal LM of the LLaVA config without its multimodal keys
    text_cfg = tf.AutoConfig.for_model(ORIGINAL_TYPES[mt], **{
        k: v for k, v in cfg.items() if k not in _LLAVA_KEYS and not k.startswith("mm_")})
    llm = tf.AutoModelForCausalLM.from_pretrained(str(path), config=text_cfg, dtype=torch_dtype)
    tok = tf.AutoTokenizer.from_pretrained(str(path), config=text_cfg)
    if cfg.get("mm_use_im_patch_token", True):  # LLaVA's loader adds it (default True)
        tok.add_tokens([IM_PATCH], special_tokens=True)
    image_token_id = ensure_image_token(tok, llm)
    name, pcfg, state = None, {}, {}
    if keep_projector:
        weights = read_tensors(path, "model.mm_projector.")
        name, pcfg, state = _original_projector(ptype, select, tower.config.hidden_size,
                                                llm.get_input_embeddings().embedding_dim,
                                                weights)
    return _Parts(tower, llm, tok, proc, image_token_id, layer, select, name, pcfg, state,
                  "pad" if aspect == "pad" else "crop")


def load_llava(cls, path, *, projector=None, projector_kwargs: dict | None = None,
               vision_tower=None, torch_dtype=None, vision_feature_layer=None):
    """An ``MLLM`` (``cls``) from a LLaVA checkpoint directory or Hub name (module docstring).

    ``projector``: None keeps the checkpoint's projector and its weights (a registry
    ``mlp2x_gelu`` / ``linear``, or ``mlp`` for the other variants); a registry name (built with
    ``projector_kwargs``, fresh weights), a ``proj.config`` dict or a module replaces it, on
    the same tower and LLM (their weights unchanged; a new projector takes the patch grid).
    ``vision_tower``: original layout only, the tower to use instead of ``mm_vision_tower``
    (a local directory, a name or a module). ``torch_dtype``: the dtype of the loaded weights
    (None: as saved). ``vision_feature_layer``: None keeps the checkpoint's; another layer only
    with a new projector (the checkpoint's was trained on its own layer).
    """
    if projector_kwargs and not isinstance(projector, str):
        raise ValueError("projector_kwargs goes with projector=<registry name>")
    src = _local_dir(path)
    cfg = read_config(src)
    if (src / "adapter_config.json").is_file():
        raise ValueError(f"{str(path)!r} is a LoRA adapter checkpoint; merge it into its base "
                         f"first (LLaVA's scripts/merge_lora_weights.py)")
    if "quantization_config" in cfg:
        raise ValueError("quantization_config: quantised LLaVA checkpoints are not supported")
    layout = llava_layout(cfg)
    if layout is None:
        raise ValueError(f"{str(path)!r} is not a LLaVA checkpoint (config.json has neither "
                         f"mm_vision_tower nor model_type 'llava' with text_config / "
                         f"vision_config)")
    parts = (_read_hf(src, torch_dtype, vision_tower) if layout == LLAVA_HF
             else _read_original(src, cfg, torch_dtype, vision_tower, projector is None))
    tower, llm = parts.tower, parts.llm
    n_tower_layers = tower.config.num_hidden_layers
    layers = check_feature_layer(parts.feature_layer, n_tower_layers)
    if vision_feature_layer is not None:
        vision_feature_layer = check_feature_layer(vision_feature_layer, n_tower_layers)
        if projector is None and vision_feature_layer != layers:
            raise ValueError(f"vision_feature_layer {vision_feature_layer} differs from the "
                             f"checkpoint's {layers}, on which its projector was trained; pass "
                             f"projector= to train a new one on another layer")
        layers = vision_feature_layer
    grid = vision_grid_of(tower.config)
    width = tower.config.hidden_size * (len(layers) if isinstance(layers, list) else 1)
    llm_width = llm.get_input_embeddings().embedding_dim
    if projector is None:
        proj = build_projector(parts.proj_name, vision_width=width, llm_width=llm_width,
                               visual_grid=grid, **parts.proj_config)
        proj.load_state_dict(parts.proj_state, strict=True)
        dtype = torch_dtype or next((t.dtype for t in parts.proj_state.values()),
                                    torch.get_default_dtype())
        proj.to(dtype)
        select = parts.select_feature
    else:
        proj = resolve_projector(projector, projector_kwargs, vision_width=width,
                                 llm_width=llm_width, visual_grid=grid)
        select = "cls_patch" if getattr(proj, "cls_token", False) else "patch"
        _check_select(select, _tower_has_cls(tower), "projector with cls_token=True")
    tok = parts.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return cls(tower, proj, llm, parts.image_token_id, vision_feature_layer=layers,
               vision_select_feature=select, tokenizer=tok, image_processor=parts.image_processor,
               image_aspect_ratio=parts.image_aspect_ratio)


# ---------------------------------------------------------------------------------- writing
def exportable_projector(projector: nn.Module) -> tuple[str, bool]:
    """``(act, bias)`` of a projector the llava-hf format holds; ``ValueError`` otherwise,
    saying which can be exported and what to use instead."""
    if isinstance(projector, MLPProjector) and len(projector.mlp) == 3:
        return projector.config.get("act", "gelu"), bool(projector.config.get("bias", True))
    name = getattr(projector, "config", {}).get("name", type(projector).__name__) \
        if isinstance(getattr(projector, "config", None), dict) else type(projector).__name__
    raise ValueError(f"projector {name!r} cannot be written as llava-hf: that format holds "
                     f"{EXPORTABLE} only. Save it with MLLM.save_pretrained (MLLM.from_pretrained "
                     f"loads it back; `python -m models.train export` without --format llava)")


def _jinja(fmt: str, **names) -> str:
    """A ``str.format`` pattern (``{msg}``, ``{system}``) as Jinja: literals quoted, fields as
    the Jinja expressions ``names`` gives."""
    out = []
    for lit, fld, _, _ in string.Formatter().parse(fmt):
        if lit:
            out.append("{{ " + json.dumps(lit, ensure_ascii=False) + " }}")
        if fld is not None:
            out.append("{{ " + names[fld] + " }}")
    return "".join(out)


def chat_template_jinja(template: str, *, add_bos: bool = False,
                        image_text: str = IMAGE_PLACEHOLDER + "\n") -> str | None:
    """A Jinja chat template rendering ``messages`` as :mod:`models.mllm.conversation`'s
    ``template`` does (None for ``plain``, which is no chat format). Message content is a
    string or llava-hf's list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
    items, images first as ``image_text`` each (``<image>\\n``: LLaVA's data convention; see
    :func:`save_llava` for ``"<image> \\n"``). A leading ``system`` message replaces the
    template's system prompt. Every user turn ends with the assistant's header
    (``add_generation_prompt`` is implied). ``add_bos``: start with ``bos_token`` (for
    tokenizers that do not add it themselves)."""
    if template == "chat_template":
        raise ValueError("template 'chat_template' is the tokenizer's own: export it as is")
    tmpl = get_template(template)
    if tmpl is None:
        return None
    names = dict(msg="text", system="ns.system")
    end = "{{ eos_token }}" if tmpl.end is None else _jinja(tmpl.end)
    bos = "{{ bos_token }}" if add_bos and tmpl.bos else ""
    return (
        "{%- set ns = namespace(system=" + json.dumps(tmpl.system, ensure_ascii=False)
        + ", first=true) -%}" + bos
        + "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set parts = namespace(images='', text='') -%}"
        "{%- for c in message['content'] -%}"
        "{%- if c['type'] == 'image' -%}{%- set parts.images = parts.images + "
        + json.dumps(image_text) + " -%}"
        "{%- elif c['type'] == 'text' -%}{%- set parts.text = parts.text + c['text'] -%}"
        "{%- endif -%}{%- endfor -%}{%- set text = parts.images + parts.text -%}{%- endif -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = text -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if ns.first -%}" + _jinja(tmpl.first_user, **names) + "{%- set ns.first = false -%}"
        "{%- else -%}" + _jinja(tmpl.between) + _jinja(tmpl.user, **names) + "{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}" + _jinja(tmpl.assistant, **names) + end
        + "{%- endif -%}{%- endfor -%}")


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def save_llava(model, path, *, template: str = "vicuna_v1") -> None:
    """Write ``model`` as a llava-hf directory: ``LlavaForConditionalGeneration.from_pretrained``
    and ``AutoProcessor.from_pretrained`` load it as is (module docstring). The weights are
    saved in the model's dtype (cast the model first for another). ``template``: the
    conversation template the model was trained with, written as the processor's chat template
    (``chat_template``: the tokenizer's own; ``plain``: none). LoRA adapters must be merged
    first; projectors other than a 2-layer MLP raise ``ValueError``."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    if model.is_lora:
        raise ValueError("merge_lora() before save_llava (the llava-hf format holds plain "
                         "weights)")
    act, bias = exportable_projector(model.projector)
    tok, proc = model.tokenizer, model.image_processor
    if tok is None or not hasattr(proc, "to_dict"):
        raise ValueError("save_llava needs the model's tokenizer and a transformers image "
                         "processor (the processor is part of the export)")
    tower, llm = model.vision_tower, model.llm
    base = getattr(llm, llm.base_model_prefix)
    head = llm.get_output_embeddings()
    for what, mod, cfg in (("vision tower", tower, tower.config), ("LLM", base, llm.config)):
        want = MODEL_MAPPING.get(type(cfg), None)
        if want is not type(mod):
            raise ValueError(f"the {what} is a {type(mod).__name__}; LlavaForConditionalGeneration "
                             f"builds a {getattr(want, '__name__', None)} from its config")
    has_cls = _tower_has_cls(tower)
    cls_patch = model.vision_select_feature == "cls_patch"
    strategy = "full" if cls_patch or not has_cls else "default"
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = llm.get_input_embeddings().num_embeddings
    dtype = next(llm.parameters()).dtype
    cfg = tf.LlavaConfig(
        vision_config=copy.deepcopy(tower.config).to_dict(), text_config=text_config.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.num_visual_tokens,
        vision_feature_layer=model.vision_feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act=act,
        multimodal_projector_bias=bias,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    cfg.dtype = dtype
    with torch.device("meta"):
        hf = tf.LlavaForConditionalGeneration(cfg)
    hf.model.vision_tower, hf.model.language_model, hf.lm_head = tower, base, head
    hf.model.multi_modal_projector.linear_1 = model.projector.mlp[0]
    hf.model.multi_modal_projector.linear_2 = model.projector.mlp[2]
    left = [n for n, t in chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"LlavaForConditionalGeneration parts not filled: {left[:5]}")
    gen = copy.deepcopy(llm.generation_config)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, k, None) is None and getattr(tok, k, None) is not None:
            setattr(gen, k, getattr(tok, k))
    hf.generation_config = gen
    image_token = tok.convert_ids_to_tokens(model.image_token_id)
    if tok.encode(image_token, add_special_tokens=False) != [model.image_token_id]:
        raise ValueError(f"the tokenizer does not encode {image_token!r} as the single "
                         f"image_token_id {model.image_token_id}: a LlavaProcessor could not "
                         f"find the image tokens")
    # the model's image policy kept by the processor (serving sees images as training did)
    proc = padding_processor(proc, model.image_aspect_ratio == "pad")
    make = lambda chat: tf.LlavaProcessor(  # noqa: E731
        image_processor=proc, tokenizer=tok, patch_size=model.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=int(has_cls),
        image_token=image_token, chat_template=chat)
    if template in ("chat_template", "plain"):
        processor = make(tok.chat_template if template == "chat_template" else None)
    else:
        # Training tokenises the text after each <image> alone (LLaVA's tokenizer_image_token),
        # so a SentencePiece (Metaspace) tokenizer starts it with its '▁' prefix; a processor
        # tokenises the whole prompt, where text after the <image> special token gets no
        # prefix (non-legacy Llama tokenizers). "<image> \n" gives that '▁' back: the
        # rendering whose processor ids equal the training ids is kept.
        add_bos = not _adds_bos(tok)
        for image_text in (IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER + " \n"):
            processor = make(chat_template_jinja(template, add_bos=add_bos,
                                                 image_text=image_text))
            got, want = _prompt_ids(processor, model, template)
            if got == want:
                break
        else:
            warnings.warn(f"the exported processor + chat template tokenise a prompt as {got} "
                          f"but the model was trained on {want} (template {template!r}): "
                          f"serving sees other token ids than training", stacklevel=2)
            processor = make(chat_template_jinja(template, add_bos=add_bos))
    _check_processor(processor, model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    processor.save_pretrained(path)


PROBE_QUESTION = "What is it?"


def _prompt_ids(processor, model, template: str) -> tuple[list[int], list[int]]:
    """``(processor ids, training ids)`` of a one-image generation prompt: the processor's
    chat template + tokenisation of ``[image, PROBE_QUESTION]``, and
    :func:`~models.mllm.conversation.tokenize_conversation` of ``"<image>\\n" +
    PROBE_QUESTION`` (what the model was trained on)."""
    from PIL import Image
    from .conversation import tokenize_conversation
    side = int(model.vision_tower.config.image_size)
    conv = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": PROBE_QUESTION}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    got = processor(images=[Image.new("RGB", (side, side))], text=[text],
                    return_tensors="pt")["input_ids"][0].tolist()
    want = tokenize_conversation(
        model.tokenizer, [{"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + PROBE_QUESTION}],
        image_token_id=model.image_token_id, num_image_tokens=model.num_visual_tokens,
        template=template, for_generation=True)["input_ids"]
    return got, want


def _check_processor(processor, model) -> None:
    """The processor must expand ``<image>`` to the model's ``num_visual_tokens`` tokens for a
    tower-sized image (its resize / crop and the strategy settings agree with the model)."""
    from PIL import Image
    side = int(model.vision_tower.config.image_size)
    enc = processor(images=Image.new("RGB", (side + 3, side)), text=IMAGE_PLACEHOLDER,
                    return_tensors="pt")
    n = int((enc["input_ids"] == model.image_token_id).sum())
    if n != model.num_visual_tokens or tuple(enc["pixel_values"].shape[-2:]) != (side, side):
        raise ValueError(f"the exported processor gives {n} image tokens and "
                         f"{tuple(enc['pixel_values'].shape[-2:])} pixels per image; the model "
                         f"takes {model.num_visual_tokens} tokens of {side}x{side} images (check "
                         f"the image processor's size / crop_size)")
