"""``MLLM``: a Hugging Face vision tower, a registry projector and a Hugging Face causal LM.

>>> model = MLLM.build(vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5",
...                    projector="pargo")                                   # doctest: +SKIP

``vision_tower`` / ``llm`` / ``tokenizer`` / ``image_processor`` each accept a Hugging Face name,
a local directory written by ``save_pretrained``, a config object (built with fresh weights) or a
ready module. Text carries ``num_visual_tokens`` copies of the image token per image (see
:mod:`models.mllm.conversation`); ``forward`` overwrites their embeddings with the projector output.

transformers / peft are imported here, so ``import models`` stays light: import this submodule
explicitly (``from models.mllm import MLLM``).
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, tokenize_conversation
from ..projectors.registry import build_projector, projector_from_config

MLLM_CONFIG = "mllm_config.json"
PROJECTOR_WEIGHTS = "projector.pt"


# ----------------------------------------------------------------------------- component loaders
def _is_path_or_name(spec) -> bool:
    return isinstance(spec, (str, os.PathLike))


def load_vision_tower(spec, dtype=None) -> nn.Module:
    """A CLIP / SigLIP (or any HF vision) model from a name, a directory, a config or a module.

    A full CLIP / SigLIP checkpoint (text + vision) gives its vision half. ``dtype`` is passed
    to ``from_pretrained`` (None: the checkpoint's own dtype).
    """
    import transformers as tf
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, tf.PretrainedConfig):
        cfg = spec
        if hasattr(cfg, "vision_config") and cfg.vision_config is not None:
            cfg = cfg.vision_config
        cls = {"clip_vision_model": tf.CLIPVisionModel,
               "siglip_vision_model": tf.SiglipVisionModel}.get(cfg.model_type)
        if cls is None:
            return tf.AutoModel.from_config(cfg)
        return cls(cfg)
    if _is_path_or_name(spec):
        spec = str(spec)
        cfg = tf.AutoConfig.from_pretrained(spec)
        if cfg.model_type in ("clip", "clip_vision_model"):
            return tf.CLIPVisionModel.from_pretrained(spec, dtype=dtype)
        if cfg.model_type in ("siglip", "siglip_vision_model"):
            return tf.SiglipVisionModel.from_pretrained(spec, dtype=dtype)
        model = tf.AutoModel.from_pretrained(spec, dtype=dtype)
        return getattr(model, "vision_model", model)
    raise TypeError(f"vision_tower must be a name, a path, a PretrainedConfig or an nn.Module, "
                    f"got {type(spec).__name__}")


def load_llm(spec, dtype=None, **from_pretrained_kwargs) -> nn.Module:
    """A causal LM from a name, a directory, a config (fresh weights) or a module. ``dtype`` and
    ``from_pretrained_kwargs`` (e.g. ``quantization_config``) go to ``from_pretrained``."""
    import transformers as tf
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, tf.PretrainedConfig):
        return tf.AutoModelForCausalLM.from_config(spec)
    if _is_path_or_name(spec):
        return tf.AutoModelForCausalLM.from_pretrained(str(spec), dtype=dtype,
                                                       **from_pretrained_kwargs)
    raise TypeError(f"llm must be a name, a path, a PretrainedConfig or an nn.Module, "
                    f"got {type(spec).__name__}")


def load_tokenizer(spec):
    import transformers as tf
    if _is_path_or_name(spec):
        return tf.AutoTokenizer.from_pretrained(str(spec))
    if hasattr(spec, "convert_tokens_to_ids"):
        return spec
    raise TypeError(f"tokenizer must be a name, a path or a tokenizer, got {type(spec).__name__}")


def default_image_processor(vision_config):
    """A ``CLIPImageProcessor`` (resize + centre crop to the tower's ``image_size``, CLIP mean/std)."""
    import transformers as tf
    size = int(vision_config.image_size)
    return tf.CLIPImageProcessor(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})


def load_image_processor(spec, vision_config=None):
    import transformers as tf
    if spec is None:
        if vision_config is None:
            raise ValueError("image_processor is None and there is no vision config to build one")
        return default_image_processor(vision_config)
    if _is_path_or_name(spec):
        return tf.AutoImageProcessor.from_pretrained(str(spec))
    if callable(spec):
        return spec
    raise TypeError(f"image_processor must be a name, a path or an image processor, "
                    f"got {type(spec).__name__}")


def vision_grid_of(vision_config) -> tuple[int, int]:
    side = int(vision_config.image_size) // int(vision_config.patch_size)
    return side, side


# ------------------------------------------------------------------------------------------ model

def resolve_projector(projector, projector_kwargs=None, **build_kwargs) -> nn.Module:
    """The projector ``projector`` stands for: a registry name (built with ``build_kwargs`` and
    ``projector_kwargs``), a config dict (``projector_from_config``) or a module as it is."""
    if isinstance(projector, str):
        return build_projector(projector, **build_kwargs, **(projector_kwargs or {}))
    if isinstance(projector, dict):
        return projector_from_config(projector)
    if isinstance(projector, nn.Module):
        return projector
    raise TypeError(f"projector must be a registry name, a config dict or an nn.Module, "
                    f"got {type(projector).__name__}")

class MLLM(nn.Module):
    """Vision tower -> projector -> causal LM, LLaVA style.

    ``forward(input_ids, attention_mask, pixel_values, labels)`` returns
    ``{"logits", "loss", "loss_sum", "num_tokens"}``; the loss is ``loss_sum / num_tokens``, a
    token mean over the labels that are not ``-100`` (after the causal shift), or
    ``loss_sum / num_items_in_batch`` when ``transformers.Trainer`` passes the label count of
    the whole global batch (so the loss of a step does not depend on how it is split into
    micro-batches and processes). ``input_ids`` must contain ``num_visual_tokens`` image
    tokens per image, in the order of ``pixel_values``; or ``pixel_values`` is a list of
    images of different sizes (+ ``visual_grids``), each giving ``packed_tokens_for_grid`` of
    its patch grid (:meth:`embed`). Position ids follow the attention mask,
    so left and right padding give the same logits on real tokens.

    The projector's input is the tower's hidden state ``vision_feature_layer`` (an int, or a
    list of layers concatenated along the channels, as llava-hf's ``vision_feature_layer``)
    with ``vision_select_feature`` ``"patch"`` (the patch grid: the CLS token, when the tower
    has one, dropped) or ``"cls_patch"`` (CLS first, then the grid: LLaVA's ``cls_patch``; the
    projector must then take ``1 + rows * cols`` tokens, and no packed batches).

    ``image_aspect_ratio`` (``"pad"``, LLaVA-1.5's default, or ``"crop"``) is how images are
    made square for the tower (:func:`models.mllm.data.fixed_pixels`): :meth:`preprocess_images`
    (so :meth:`chat` and the MME evaluation) applies it, the trainer sets it to the run's
    ``--image_aspect_ratio``, it is saved in the model config and an llava-hf export's image
    processor pads iff it is ``"pad"``, so images are seen as in training.
    LLaVA checkpoints: :meth:`from_llava` / :meth:`save_llava` (:mod:`models.mllm.llava`).
    """
    # transformers.Trainer: forward takes num_items_in_batch, counted over labels[:, 1:]
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, llm: nn.Module,
                 image_token_id: int, *, vision_feature_layer: int | list[int] = -2,
                 vision_select_feature: str = "patch", freeze_vision_tower: bool = True,
                 tokenizer=None, image_processor=None, image_aspect_ratio: str = "pad"):
        super().__init__()
        for name, mod in (("vision_tower", vision_tower), ("projector", projector), ("llm", llm)):
            if not isinstance(mod, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(mod).__name__}")
        vision_feature_layer = check_feature_layer(vision_feature_layer,
                                                   vision_tower.config.num_hidden_layers)
        if vision_select_feature not in SELECT_FEATURES:
            raise ValueError(f"vision_select_feature must be one of {SELECT_FEATURES}, got "
                             f"{vision_select_feature!r}")
        vocab = llm.get_input_embeddings().num_embeddings
        if not 0 <= int(image_token_id) < vocab:
            raise ValueError(f"image_token_id must be in [0, {vocab}), got {image_token_id}")
        self.vision_tower, self.projector, self.llm = vision_tower, projector, llm
        self.image_token_id = int(image_token_id)
        self.vision_feature_layer = vision_feature_layer
        self.vision_select_feature = vision_select_feature
        self.visual_grid = vision_grid_of(vision_tower.config)
        if tuple(projector.visual_grid) != self.visual_grid:
            raise ValueError(f"projector visual_grid {tuple(projector.visual_grid)} does not match "
                             f"the vision tower's {self.visual_grid}")
        want = self.visual_grid[0] * self.visual_grid[1] + (vision_select_feature == "cls_patch")
        got = getattr(projector, "num_input_tokens", want)
        if got != want:
            raise ValueError(f"the projector takes {got} tokens but vision_select_feature="
                             f"{vision_select_feature!r} gives it {want} (a {self.visual_grid} grid"
                             f"{' + CLS' if vision_select_feature == 'cls_patch' else ''})")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.set_vision_tower_trainable(not freeze_vision_tower)

    # -- construction
    @classmethod
    def build(cls, vision_tower, llm, projector: str | dict | nn.Module = "mlp2x_gelu", *,
              tokenizer=None, image_processor=None, projector_kwargs: dict | None = None,
              vision_feature_layer: int | list[int] = -2, vision_select_feature: str = "patch",
              freeze_vision_tower: bool = True, dtype=None,
              llm_kwargs: dict | None = None, image_aspect_ratio: str = "pad") -> "MLLM":
        """Build from specs (see the module docstring). ``projector`` is a registry name (built
        with the tower's width (times the number of feature layers) and grid and the LLM's
        width, plus ``projector_kwargs``), a ``proj.config`` dict, or a module. ``tokenizer``
        defaults to ``llm`` when that is a name or path; ``<image>`` is added to it (and the
        LLM's embeddings resized) if missing. ``dtype`` / ``llm_kwargs`` go to the
        ``from_pretrained`` of components given by path."""
        tower = load_vision_tower(vision_tower, dtype=dtype)
        lm = load_llm(llm, dtype=dtype, **(llm_kwargs or {}))
        if tokenizer is None:
            if not _is_path_or_name(llm):
                raise ValueError("tokenizer is required when llm is not a name or a path")
            tokenizer = llm
        tok = load_tokenizer(tokenizer)
        image_token_id = ensure_image_token(tok, lm)
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        grid = vision_grid_of(tower.config)
        layers = check_feature_layer(vision_feature_layer, tower.config.num_hidden_layers)
        proj = resolve_projector(projector, projector_kwargs, vision_width=tower.config.hidden_size
                                 * (len(layers) if isinstance(layers, list) else 1),
                                 llm_width=lm.get_input_embeddings().embedding_dim,
                                 visual_grid=grid)
        proc = load_image_processor(image_processor, tower.config)
        model = cls(tower, proj, lm, image_token_id, vision_feature_layer=vision_feature_layer,
                    vision_select_feature=vision_select_feature,
                    freeze_vision_tower=freeze_vision_tower, tokenizer=tok, image_processor=proc,
                    image_aspect_ratio=image_aspect_ratio)
        return model

    @classmethod
    def from_llava(cls, path, *, projector=None, projector_kwargs: dict | None = None,
                   vision_tower=None, torch_dtype=None, vision_feature_layer=None) -> "MLLM":
        """The MLLM of a LLaVA checkpoint: llava-hf (``LlavaForConditionalGeneration``) or the
        original LLaVA layout; ``projector=None`` keeps its projector, a registry name (+
        ``projector_kwargs``) builds that one fresh on its tower and LLM. See
        :func:`models.mllm.llava.load_llava`."""
        from .llava import load_llava
        return load_llava(cls, path, projector=projector, projector_kwargs=projector_kwargs,
                          vision_tower=vision_tower, torch_dtype=torch_dtype,
                          vision_feature_layer=vision_feature_layer)

    def save_llava(self, path, *, template: str = "vicuna_v1") -> None:
        """Write a llava-hf directory (``LlavaForConditionalGeneration`` / ``AutoProcessor``
        load it); 2-layer MLP projectors only. See :func:`models.mllm.llava.save_llava`."""
        from .llava import save_llava
        save_llava(self, path, template=template)

    def set_vision_tower_trainable(self, trainable: bool) -> None:
        """Freeze the vision tower, or (``trainable``) train the part of it that feeds the
        features: :func:`tower_feature_parameters` (embeddings, CLIP's pre-layernorm, the layers
        up to the deepest ``vision_feature_layer``). The layers after it, the post-layernorm
        and any pooling head (SigLIP's) stay frozen: they get no gradient, so marking them
        trainable would only copy them into every checkpoint and make DDP search for unused
        parameters. They are kept in the module (not deleted, as some LLaVA variants do) so the
        tower saves, exports and reloads whole, as a frozen one does."""
        self.vision_tower.requires_grad_(False)
        if trainable:
            for p in tower_feature_parameters(self.vision_tower,
                                              self.vision_feature_layer).values():
                p.requires_grad_(True)

    @property
    def config(self):
        """The LLM's config (what ``Trainer`` / DeepSpeed read for ``hidden_size`` "auto"
        values)."""
        return self.llm.config

    @property
    def image_aspect_ratio(self) -> str:
        return self._image_aspect_ratio

    @image_aspect_ratio.setter
    def image_aspect_ratio(self, value: str) -> None:
        if value not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {value!r}")
        self._image_aspect_ratio = value

    @property
    def num_visual_tokens(self) -> int:
        return int(self.projector.num_visual_tokens)

    @property
    def is_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    def config_dict(self) -> dict:
        return {"projector": self.projector.config, "vision_feature_layer":
                self.vision_feature_layer, "vision_select_feature": self.vision_select_feature,
                "image_token": IMAGE_PLACEHOLDER,
                "image_token_id": self.image_token_id,
                "num_visual_tokens": self.num_visual_tokens,
                "image_aspect_ratio": self.image_aspect_ratio}

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Activation checkpointing in the LLM (what ``--gradient_checkpointing`` calls)."""
        self.llm.config.use_cache = False
        self.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})

    # -- LoRA
    def apply_lora(self, r: int = 256, alpha: int = 512, dropout: float = 0.05,
                   target_modules="all-linear") -> None:
        """Wrap the LLM with peft LoRA adapters (every linear layer but the LM head); the base
        LLM weights are frozen, the adapters trainable."""
        from peft import LoraConfig, get_peft_model
        if self.is_lora:
            raise ValueError("the LLM already has LoRA adapters")
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                         target_modules=target_modules, task_type="CAUSAL_LM")
        self.llm = get_peft_model(self.llm, cfg)

    def load_lora(self, adapter_dir, is_trainable: bool = False) -> None:
        from peft import PeftModel
        if self.is_lora:
            raise ValueError("the LLM already has LoRA adapters")
        self.llm = PeftModel.from_pretrained(self.llm, str(adapter_dir), is_trainable=is_trainable)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM weights (in place); the LLM becomes a plain
        ``PreTrainedModel`` again."""
        if not self.is_lora:
            raise ValueError("the LLM has no LoRA adapters to merge")
        self.llm = self.llm.merge_and_unload()

    # -- forward
    @property
    def patch_size(self) -> int:
        return int(self.vision_tower.config.patch_size)

    def packed_tokens_for_grid(self, grid) -> int:
        """Visual tokens of one image of ``grid = (rows, cols)`` patches in a packed batch (the
        projector's ``tokens_for_grid``); ``ValueError`` when the projector takes no packed
        batches (its ``tokens_for_grid`` raises ``NotImplementedError``)."""
        try:
            return int(self.projector.tokens_for_grid(tuple(grid)))
        except NotImplementedError as e:
            raise ValueError(
                f"projector {self.projector.config.get('name', type(self.projector).__name__)!r}"
                f" does not take packed batches of images of different sizes ({e}); use the "
                f"fixed resize policy (--image_resize fixed) or a projector that implements "
                f"tokens_for_grid") from e

    def _tower_features(self, pixel_values: Tensor, native: bool) -> Tensor:
        """Hidden states of ``vision_feature_layer`` for ``[n, 3, H, W]``, CLS included (several
        layers: concatenated along the channels)."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        kwargs = {}
        if native:
            if "interpolate_pos_encoding" not in inspect.signature(
                    self.vision_tower.forward).parameters:
                raise ValueError(f"vision tower {type(self.vision_tower).__name__} takes no "
                                 f"interpolate_pos_encoding: it cannot encode images of another "
                                 f"size than {self.vision_tower.config.image_size}")
            kwargs["interpolate_pos_encoding"] = True
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.vision_tower(pixel_values=pixel_values.to(tower_dtype),
                                    output_hidden_states=True, **kwargs)
        if isinstance(self.vision_feature_layer, list):
            return torch.cat([out.hidden_states[i] for i in self.vision_feature_layer], dim=-1)
        return out.hidden_states[self.vision_feature_layer]

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[N, 3, H, W]`` -> ``[N, num_visual_tokens, llm_width]``."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [N, 3, H, W], got {tuple(pixel_values.shape)}")
        feats = self._tower_features(pixel_values, native=False)
        grid_tokens = self.visual_grid[0] * self.visual_grid[1]
        if self.vision_select_feature == "cls_patch":
            if feats.shape[1] != grid_tokens + 1:
                raise ValueError(f"vision_select_feature='cls_patch' needs a tower with a CLS "
                                 f"token: it gave {feats.shape[1]} tokens for grid "
                                 f"{self.visual_grid}")
        elif feats.shape[1] == grid_tokens + 1:  # CLS first (CLIP)
            feats = feats[:, 1:]
        elif feats.shape[1] != grid_tokens:
            raise ValueError(f"vision tower gave {feats.shape[1]} tokens, expected {grid_tokens} "
                             f"(+1 CLS) for grid {self.visual_grid}")
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def packed_grids(self, pixel_values, visual_grids=None) -> list[tuple[int, int]]:
        """The patch grid of each ``[3, H, W]`` image of a packed list (checked against
        ``visual_grids`` when given: ``[N, 2]`` ints or pairs)."""
        if len(pixel_values) == 0:
            raise ValueError("pixel_values is an empty list (pass None for no images)")
        p = self.patch_size
        grids = []
        for i, x in enumerate(pixel_values):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] % p or x.shape[2] % p \
                    or x.shape[1] == 0 or x.shape[2] == 0:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"pixel_values[{i}] must be a [3, H, W] tensor with H and W "
                                 f"positive multiples of the patch size {p}, got {shape}")
            grids.append((int(x.shape[1]) // p, int(x.shape[2]) // p))
        if visual_grids is not None:
            given = [tuple(int(v) for v in g) for g in
                     (visual_grids.tolist() if isinstance(visual_grids, Tensor) else visual_grids)]
            if given != grids:
                raise ValueError(f"visual_grids {given} do not match the images' patch grids "
                                 f"{grids} (patch size {p})")
        return grids

    def encode_images_packed(self, pixel_values, visual_grids=None) -> tuple[Tensor, list[int]]:
        """A list of ``[3, H_i, W_i]`` images (sizes multiples of the patch) -> ``(y [total,
        llm_width], counts)``: the tower runs once per distinct size (images of equal size
        batched) at the image's own grid (``interpolate_pos_encoding``), the features of every
        image (CLS dropped) are packed in list order and the projector runs once on the packed
        batch; ``counts[i]`` tokens of ``y`` belong to image ``i``, in order."""
        if self.vision_select_feature != "patch":
            raise ValueError(f"vision_select_feature={self.vision_select_feature!r}: packed "
                             f"batches take the patch grid only (a CLS token has no grid cell)")
        grids = self.packed_grids(pixel_values, visual_grids)
        expected = [self.packed_tokens_for_grid(g) for g in grids]  # refuses unpacked projectors
        tower_grid = vision_grid_of(self.vision_tower.config)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_size.setdefault(g, []).append(i)
        feats: list[Tensor | None] = [None] * len(grids)
        for g, idx in by_size.items():
            hs = self._tower_features(torch.stack([pixel_values[i] for i in idx]),
                                      native=g != tower_grid)
            n = g[0] * g[1]
            if hs.shape[1] == n + 1:  # CLS first (CLIP)
                hs = hs[:, 1:]
            elif hs.shape[1] != n:
                raise ValueError(f"vision tower gave {hs.shape[1]} tokens for a {g} patch grid, "
                                 f"expected {n} (+1 CLS)")
            for k, i in enumerate(idx):
                feats[i] = hs[k]
        proj_dtype = next(self.projector.parameters()).dtype
        y, counts = self.projector(torch.cat(feats).to(proj_dtype), visual_grids=grids)
        counts = [int(c) for c in counts]
        if counts != expected or sum(counts) != y.shape[0]:
            raise ValueError(f"projector returned counts {counts} for {y.shape[0]} tokens; its "
                             f"tokens_for_grid gives {expected}")
        return y, counts

    @staticmethod
    def _check_image_runs(is_image: Tensor, counts: list[int]) -> None:
        """Each maximal run of image tokens of a row must hold whole images, consecutive in
        ``counts`` order (so image ``i``'s tokens land on its own placeholder)."""
        mask = is_image.cpu()
        k = 0
        for b, row in enumerate(mask):
            edges = torch.diff(row.to(torch.int8), prepend=row.new_zeros(1, dtype=torch.int8),
                               append=row.new_zeros(1, dtype=torch.int8))
            starts = (edges == 1).nonzero()[:, 0].tolist()
            ends = (edges == -1).nonzero()[:, 0].tolist()
            for s, e in zip(starts, ends):
                acc = 0
                while acc < e - s and k < len(counts):
                    acc, k = acc + counts[k], k + 1
                if acc != e - s:
                    raise ValueError(f"input_ids row {b}: the run of {e - s} image tokens at "
                                     f"position {s} does not hold whole images (the images' "
                                     f"token counts are {counts})")
        if k != len(counts):
            raise ValueError(f"input_ids hold image tokens for {k} image(s) but pixel_values "
                             f"has {len(counts)}")

    def embed(self, input_ids: Tensor, pixel_values, visual_grids=None) -> Tensor:
        """Token embeddings with the image tokens replaced by the projector output.

        ``pixel_values``: ``[N, 3, H, W]`` at the tower's size (each image gives
        ``num_visual_tokens``), or a list of ``[3, H_i, W_i]`` images of any sizes (multiples of
        the patch) with optional ``visual_grids`` (:meth:`encode_images_packed`; image ``i``
        gives ``packed_tokens_for_grid`` of its grid). Either way the images' tokens fill the
        image-token positions in order, row after row."""
        if isinstance(pixel_values, (list, tuple)):
            embeds = self.llm.get_input_embeddings()(input_ids)
            is_image = input_ids == self.image_token_id
            visual, counts = self.encode_images_packed(pixel_values, visual_grids)
            self._check_image_runs(is_image, counts)
            return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))
        if visual_grids is not None:
            raise ValueError("visual_grids goes with a list of pixel_values (packed images)")
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_img_tokens = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_img_tokens != n_images * self.num_visual_tokens:
            raise ValueError(f"input_ids hold {n_img_tokens} image tokens but pixel_values has "
                             f"{n_images} images x {self.num_visual_tokens} visual tokens")
        if n_images == 0:
            return embeds
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | list | None = None, labels: Tensor | None = None,
                num_items_in_batch: Tensor | int | None = None, visual_grids=None) -> dict:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values, visual_grids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).logits
        out = {"logits": logits}
        if labels is not None:
            shift_logits = logits[:, :-1]
            if shift_logits.element_size() < 4:  # 16-bit logits: the softmax in float32
                shift_logits = shift_logits.float()
            shift_labels = labels[:, 1:]
            loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                       shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
            num = (shift_labels != IGNORE_INDEX).sum()
            denom = num.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            out.update(loss_sum=loss_sum, num_tokens=num, loss=loss_sum / denom)
        return out

    # -- generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values,
                 visual_grids=None, **generate_kwargs) -> Tensor:
        """Batched generation from left-padded prompts; returns only the new token ids."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left padding (attention_mask[:, -1] must be all 1)")
        embeds = self.embed(input_ids, pixel_values, visual_grids)
        generate_kwargs.setdefault("do_sample", False)
        tok = self.tokenizer
        if tok is not None:
            generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
            generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 **generate_kwargs)

    def preprocess_images(self, images) -> Tensor:
        """PIL images as ``[N, 3, S, S]`` under the model's ``image_aspect_ratio`` (as the
        training data of the fixed resize policy)."""
        from .data import fixed_pixels
        if self.image_processor is None:
            raise ValueError("this MLLM has no image_processor")
        return torch.stack([fixed_pixels(self.image_processor, im.convert("RGB"),
                                         self.image_aspect_ratio) for im in images])

    def prompt_ids(self, questions: list[str], template: str = "vicuna_v1"):
        """Left-padded generation prompts (``<image>`` prepended where absent): ``(input_ids,
        attention_mask)``, both ``[len(questions), L]`` on the CPU."""
        seqs = []
        for q in questions:
            if IMAGE_PLACEHOLDER not in q:
                q = IMAGE_PLACEHOLDER + "\n" + q
            seqs.append(tokenize_conversation(
                self.tokenizer, [{"from": "human", "value": q}], image_token_id=self.image_token_id,
                num_image_tokens=self.num_visual_tokens, template=template,
                for_generation=True)["input_ids"])
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device="cpu")
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device="cpu")
        return ids, mask

    @torch.no_grad()
    def chat(self, images, questions: list[str], *, template: str = "vicuna_v1",
             max_new_tokens: int = 32, **generate_kwargs) -> list[str]:
        """Answer ``questions[i]`` about PIL image ``images[i]`` (``<image>`` is prepended to a
        question that lacks it). Returns the decoded answers."""
        if self.tokenizer is None:
            raise ValueError("this MLLM has no tokenizer")
        if len(images) != len(questions):
            raise ValueError(f"images and questions must have the same length, got "
                             f"{len(images)} and {len(questions)}")
        ids, mask = self.prompt_ids(questions, template)
        device = next(self.llm.parameters()).device
        pix = self.preprocess_images(images).to(device)
        out = self.generate(ids.to(device), mask.to(device), pix, max_new_tokens=max_new_tokens,
                            **generate_kwargs)
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # -- persistence
    def save_pretrained(self, path) -> None:
        """Self-contained directory: the LLM (``AutoModelForCausalLM.from_pretrained(path)``
        loads it), tokenizer and image processor at the top level, ``vision_tower/``,
        ``projector.pt`` and ``mllm_config.json``. LoRA models must be merged first."""
        if self.is_lora:
            raise ValueError("merge_lora() before save_pretrained (or save the adapter with "
                             "model.llm.save_pretrained)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(path)
        self.vision_tower.save_pretrained(path / "vision_tower")
        torch.save(self.projector.state_dict(), path / PROJECTOR_WEIGHTS)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.image_processor is not None and hasattr(self.image_processor, "save_pretrained"):
            self.image_processor.save_pretrained(path)
        with open(path / MLLM_CONFIG, "w") as f:
            json.dump(self.config_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, path, torch_dtype=None) -> "MLLM":
        path = Path(path)
        if not (path / MLLM_CONFIG).is_file():
            raise ValueError(f"path {str(path)!r} has no {MLLM_CONFIG} (not an MLLM directory)")
        with open(path / MLLM_CONFIG) as f:
            cfg = json.load(f)
        import transformers as tf
        llm = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tower = load_vision_tower(path / "vision_tower")
        proc = (tf.AutoImageProcessor.from_pretrained(path)
                if (path / "preprocessor_config.json").is_file() else None)
        model = cls.build(tower, llm, cfg["projector"], tokenizer=path, image_processor=proc,
                          vision_feature_layer=cfg["vision_feature_layer"],
                          vision_select_feature=cfg.get("vision_select_feature", "patch"),
                          image_aspect_ratio=cfg.get("image_aspect_ratio", "pad"))
        model.projector.load_state_dict(torch.load(path / PROJECTOR_WEIGHTS, map_location="cpu"))
        return model


SELECT_FEATURES = ("patch", "cls_patch")


def check_feature_layer(layer, num_layers: int) -> int | list[int]:
    """``layer`` (an int, or a non-empty list of ints: hidden states concatenated) checked
    against a ``num_layers``-layer tower (``hidden_states`` has ``num_layers + 1`` entries)."""
    items = layer if isinstance(layer, (list, tuple)) else [layer]
    if not items or any(isinstance(x, bool) or not isinstance(x, int) for x in items):
        raise TypeError(f"vision_feature_layer must be an int or a non-empty list of ints, got "
                        f"{layer!r}")
    bad = [x for x in items if not -(num_layers + 1) <= x <= num_layers]
    if bad:
        raise ValueError(f"vision_feature_layer must be in [{-(num_layers + 1)}, {num_layers}] "
                         f"for a {num_layers}-layer tower, got {layer}")
    return list(items) if isinstance(layer, (list, tuple)) else int(layer)


def tower_feature_parameters(tower: nn.Module, feature_layer) -> dict[str, nn.Parameter]:
    """The parameters of ``tower`` that ``hidden_states[feature_layer]`` depends on (a list:
    on any of them). Hugging Face vision towers hold their ``num_hidden_layers`` layers in one
    ``ModuleList``; ``hidden_states[k]`` is the output of its first ``k`` layers, so it depends
    on the parameters registered before the list (embeddings, CLIP's pre-layernorm) and on
    layers ``0 .. k-1``, not on the later layers nor on what is registered after the list
    (post-layernorm, pooling head). A tower without that structure: all its parameters, with
    a warning."""
    n = int(tower.config.num_hidden_layers)
    layers = check_feature_layer(feature_layer, n)
    deepest = max(x % (n + 1) for x in (layers if isinstance(layers, list) else [layers]))
    params = list(tower.named_parameters())
    lists = [name for name, m in tower.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name]
    where = None
    if len(lists) == 1:
        prefix = lists[0] + "."
        where = [i for i, (name, _) in enumerate(params) if name.startswith(prefix)]
        if not where or where != list(range(where[0], where[-1] + 1)):
            where = None
    if where is None:
        warnings.warn(f"vision tower {type(tower).__name__}: no single list of its "
                      f"{n} layers found, so the layers after vision_feature_layer cannot be "
                      f"told apart: all its parameters train (some may get no gradient)",
                      stacklevel=3)
        return dict(params)
    used = dict(params[:where[0]])
    for name, p in params[where[0]:where[-1] + 1]:
        if int(name[len(prefix):].split(".", 1)[0]) < deepest:
            used[name] = p
    return used


def ensure_image_token(tokenizer, llm: nn.Module) -> int:
    """The id of ``<image>`` in ``tokenizer``, adding it if missing. The LLM's embeddings (and
    untied output head) then grow by rows set to the mean of the old rows: deterministic, so
    rebuilding the model from the same LLM path reproduces them exactly (no copy of the resized
    LLM is needed to restore a checkpoint)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if tid is None or tid == tokenizer.unk_token_id:
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
        tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    n_old = llm.get_input_embeddings().num_embeddings
    if tid >= n_old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        heads = [llm.get_input_embeddings(), llm.get_output_embeddings()]
        weights = {id(m.weight): m.weight for m in heads if m is not None}  # tied: once
        for w in weights.values():
            with _gathered(w):
                with torch.no_grad():
                    w[n_old:] = w[:n_old].mean(0)
    return int(tid)


def _gathered(param):
    """The whole of ``param`` (ZeRO-3 partitions it; rank 0's writes are kept)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():
        import deepspeed
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    import contextlib
    return contextlib.nullcontext()


# ------------------------------------------------------------------------- tiny in-code models
_BASE_WORDS = ("A a chat between curious user and an artificial intelligence assistant The "
               "gives helpful detailed polite answers to the user s questions USER ASSISTANT "
               "Is there in this image Please answer yes or no Yes No What . , ' ? : !").split()


def word_level_tokenizer(words=(), *, model_max_length: int = 4096):
    """A ``WordLevel`` tokenizer (words and punctuation split) (``PreTrainedTokenizerFast``) built in code, with
    ``<unk> <pad> <s> </s> <image>`` special tokens and the vicuna template's words."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    vocab: dict[str, int] = {}
    for w in [*specials, *_BASE_WORDS, *words]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>",
                                  model_max_length=model_max_length)
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def tiny_components(words=(), *, image_size: int = 28, patch_size: int = 4,
                    vision_hidden: int = 32, vision_layers: int = 2, llm_hidden: int = 64,
                    llm_layers: int = 2) -> dict:
    """Configs and objects for a tiny MLLM built entirely in code (no download):
    ``{"vision_tower": CLIPVisionConfig, "llm": LlamaConfig, "tokenizer", "image_processor"}``,
    ready for ``MLLM.build(**tiny_components())`` or ``TrainConfig(**tiny_components(), ...)``."""
    import transformers as tf
    tok = word_level_tokenizer(words)
    vc = tf.CLIPVisionConfig(image_size=image_size, patch_size=patch_size,
                             hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                             num_hidden_layers=vision_layers, num_attention_heads=2)
    lc = tf.LlamaConfig(vocab_size=len(tok), hidden_size=llm_hidden,
                        intermediate_size=2 * llm_hidden, num_hidden_layers=llm_layers,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        tie_word_embeddings=False)
    return {"vision_tower": vc, "llm": lc, "tokenizer": tok,
            "image_processor": default_image_processor(vc)}
