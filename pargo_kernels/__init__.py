"""pargo_kernels: fast, exact kernels for the vision-language projectors ParGo and DeCo.

Public ops (all differentiable, registered with ``torch.library``)::

    partial_global_attention(q, k, v, n_partial, *, scale, visual_grid, partial_grid, backend)
    band_attention(q, k, v, window, *, scale, backend)
    pargo_self_attention(q, k, v, n_partial, window, *, scale, backend)
    cascade_windows(n_partial, n_layers, mode)
    adaptive_avg_pool_tokens(x, in_grid, out_grid, *, backend)
    adaptive_avg_pool_project(x, weight, bias, *, in_grid, out_grid, backend, fused)

Masks are small validated objects (:mod:`pargo_kernels.masks`); dense references live in
:mod:`pargo_kernels.reference`.
"""
from .attention import (band_attention, cascade_windows, pargo_self_attention,
                        partial_global_attention)
from .masks import BandMask, ParGoSelfMask, PartialGlobalMask
from .pooling import adaptive_avg_pool_project, adaptive_avg_pool_tokens
from .varlen import *  # noqa: F401,F403  packed (varlen) ops and their plans
from .varlen import __all__ as _varlen_all

__version__ = "0.1.0"
__all__ = ["partial_global_attention", "band_attention", "pargo_self_attention", "cascade_windows",
           "adaptive_avg_pool_tokens", "adaptive_avg_pool_project", "PartialGlobalMask",
           "BandMask", "ParGoSelfMask", "__version__"] + _varlen_all
