"""Benchmark: ParGo's whole self-attention as one launch (``pargo_self_attention``) against the
former two-launch composition (band over the partial queries + full attention over the global
ones + ``torch.cat``) and dense masks.

Shapes: Np=288 partial + Ng=16 global queries, B=256, H=8, D=Dv=64; the released static mask
(``window=None``) and the six symmetric cascade windows ``cascade_windows(288, 6, "symmetric")``.
``--quick``: the static mask and layer 1. ``--smoke``: tiny, CPU.

    python benchmarks/bench_pargo_self.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from attention_common import attention_case, attention_providers, ours  # noqa: E402

import pargo_kernels as pk  # noqa: E402
from pargo_kernels.masks import ParGoSelfMask  # noqa: E402

B, H, D, NP, NG, LAYERS = 256, 8, 64, 288, 16, 6


def shapes(args):
    """(name, B, H, D, Np, Ng, window or None)."""
    if args.smoke:
        b, h, d, np_, ng, layers = 2, 2, 16, 24, 4, 2
    else:
        b, h, d, np_, ng, layers = B, H, D, NP, NG, LAYERS
    wins = [None] + pk.cascade_windows(np_, layers, "symmetric")
    if args.quick:
        wins = wins[:2]
    return [(f"pgself-Np{np_}-Ng{ng}-" + ("all" if w is None else f"w{w[0]}+{w[1]}"),
             b, h, d, np_, ng, w) for w in wins]


def op(q, k, v, case, backend):
    return pk.pargo_self_attention(q, k, v, case.config["Np"], case.extra["window"],
                                   backend=backend)


def two_launch(q, k, v, case, backend):
    """What ParGo's self-attention ran before the fused op: two calls and a concatenation."""
    np_, w = case.config["Np"], case.extra["window"]
    w = (np_ - 1, np_ - 1) if w is None else w
    parts = [pk.band_attention(q[:, :, :np_], k[:, :, :np_], v[:, :, :np_], w, backend=backend)]
    if q.shape[2] > np_:
        n_g = q.shape[2] - np_
        parts.append(pk.band_attention(q[:, :, np_:], k[:, :, np_:], v[:, :, np_:],
                                       (n_g - 1, n_g - 1), backend=backend))
    return torch.cat(parts, dim=2)


def plan(args) -> list:
    """``(make_case, providers)`` per case, in ``shapes`` order."""
    base = ours("triton", two_launch)
    providers = attention_providers(args, op) + [
        common.Provider("ours-2launch[triton]", base.setup)]
    providers = common.selected(providers, args)

    def make(name, b, h, d, np_, ng, win):
        mask = ParGoSelfMask(np_ + ng, np_, *(win if win is not None else (None, None)))
        return attention_case("pargo_self", name, "pargo_self", mask, b, h, d, d, args,
                              extra=dict(Np=np_, window=None if win is None else list(win)))
    return [(lambda s=s: make(*s), providers) for s in shapes(args)]


def main(argv=None) -> int:
    args, rec = common.start("pargo_self", __doc__.splitlines()[0], argv)
    common.run_cases(plan(args), rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
