"""LLaVA's projectors: ``linear`` (LLaVA-1), ``mlp2x_gelu`` (LLaVA-1.5) and the general ``mlp``
(LLaVA's ``mlp{N}x_gelu``, ``identity`` as depth 0, and the llava-hf variants: another
activation, no biases, the CLS token kept): one output token per input token."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .common import Projector, check_grid, check_int, check_pos_int
from .registry import register_projector

# ``act`` names (transformers' ``ACT2FN`` spelling, as llava-hf's ``projector_hidden_act``) ->
# the module; written out so that the projectors do not import transformers
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_pytorch_tanh": lambda: nn.GELU("tanh"),
               "relu": lambda: nn.ReLU(), "silu": lambda: nn.SiLU()}


@register_projector("mlp")
class MLPProjector(Projector):
    """``depth`` Linear layers with ``act`` between them (``depth=1``: a single Linear;
    ``depth=0``: the identity, for ``vision_width == llm_width``); the layers are ``mlp.0``,
    ``mlp.2``, ... as in LLaVA's ``mm_projector``.

    ``bias=False``: Linear layers without bias (llava-hf's ``multimodal_projector_bias``).
    ``cls_token=True``: the input is the CLS token followed by the ``visual_grid`` patches
    (LLaVA's ``cls_patch`` / llava-hf's ``"full"`` strategy on a CLIP tower), ``1 + rows * cols``
    tokens in and out; such a projector takes no packed batches (a CLS token has no grid cell).
    """

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), depth: int = 2,
                 bias: bool = True, act: str = "gelu", cls_token: bool = False):
        vision_width = check_pos_int("vision_width", vision_width)
        llm_width = check_pos_int("llm_width", llm_width)
        visual_grid = check_grid("visual_grid", visual_grid)
        depth = check_int("depth", depth, 0)
        for name, v in (("bias", bias), ("cls_token", cls_token)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if depth == 0 and vision_width != llm_width:
            raise ValueError(f"depth=0 (identity) needs vision_width == llm_width, got "
                             f"{vision_width} and {llm_width}")
        super().__init__(dict(vision_width=vision_width, llm_width=llm_width,
                              visual_grid=list(visual_grid), depth=depth, bias=bias, act=act,
                              cls_token=cls_token))
        layers: list[nn.Module] = [nn.Linear(vision_width, llm_width, bias=bias)] if depth else []
        for _ in range(depth - 1):
            layers += [ACTIVATIONS[act](), nn.Linear(llm_width, llm_width, bias=bias)]
        self.mlp = nn.Sequential(*layers)
        self.cls_token = cls_token
        self.num_input_tokens += int(cls_token)
        self.num_visual_tokens = self.num_input_tokens

    def tokens_for_grid(self, grid) -> int:
        if self.cls_token:
            raise NotImplementedError(f"{type(self).__name__} with cls_token=True does not take "
                                      f"packed batches")
        rows, cols = check_grid("grid", grid)
        return rows * cols

    def forward(self, x: Tensor, visual_grids: Optional[Sequence] = None
                ) -> Union[Tensor, tuple[Tensor, list[int]]]:
        """``x [B, Nv, vision_width] -> [B, Nv, llm_width]``; or a packed batch ``x [total,
        vision_width]`` with ``visual_grids`` (one ``(rows, cols)`` per image) ->
        ``(y [total, llm_width], counts)``, ``counts[i] = rows_i * cols_i``."""
        if visual_grids is None:
            self.check_input(x)
            return self.mlp(x)
        if self.cls_token:
            raise ValueError("a cls_token=True projector takes no packed batches (visual_grids)")
        grids = self.check_packed(x, visual_grids)
        return self.mlp(x), [r * c for r, c in grids]


@register_projector("mlp2x_gelu")
class MLP2xGELUProjector(MLPProjector):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear, GELU, Linear."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24)):
        super().__init__(vision_width, llm_width, visual_grid, depth=2)
        for k in ("depth", "bias", "act", "cls_token"):
            del self.config[k]


@register_projector("linear")
class LinearProjector(MLPProjector):
    """LLaVA-1's single ``nn.Linear``."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24)):
        super().__init__(vision_width, llm_width, visual_grid, depth=1)
        for k in ("depth", "bias", "act", "cls_token"):
            del self.config[k]
