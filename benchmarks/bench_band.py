"""Benchmark: banded self-attention (ParGo's cascaded partial perception) against dense masks.

Shapes: the six cascade windows ``cascade_windows(288, 6)`` (causal mode) over the 288 partial
tokens, B=256, H=8, D=Dv=64. ``--quick``: layers 1 and 6 only. ``--smoke``: tiny, CPU.

    python benchmarks/bench_band.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from attention_common import attention_case, attention_providers  # noqa: E402

import pargo_kernels as pk  # noqa: E402
from pargo_kernels.masks import BandMask  # noqa: E402

B, H, D, N, LAYERS = 256, 8, 64, 288, 6


def shapes(args):
    """(name, B, H, D, N, layer, window)."""
    if args.smoke:
        b, h, d, n, layers = 2, 2, 16, 24, 2
    else:
        b, h, d, n, layers = B, H, D, N, LAYERS
    wins = pk.cascade_windows(n, layers, "causal")
    picked = list(enumerate(wins, 1))
    if args.quick:
        picked = [picked[0], picked[-1]]
    return [(f"cascade-N{n}-l{l}-w{w[0]}+{w[1]}", b, h, d, n, l, w) for l, w in picked]


def op(q, k, v, case, backend):
    return pk.band_attention(q, k, v, tuple(case.config["window"]), backend=backend)


def plan(args) -> list:
    """``(make_case, providers)`` per case, in ``shapes`` order."""
    providers = common.selected(attention_providers(args, op), args)

    def make(name, b, h, d, n, layer, win):
        return attention_case("band", name, "cascade", BandMask(n, *win), b, h, d, d, args,
                              extra=dict(layer=layer, window=list(win)))
    return [(lambda s=s: make(*s), providers) for s in shapes(args)]


def main(argv=None) -> int:
    args, rec = common.start("band", __doc__.splitlines()[1], argv)
    common.run_cases(plan(args), rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
