"""Benchmark: ParGo partial-global cross-attention against dense masked attention.

Shapes (H=8, D=Dv=64, Nq = 288 partial + 16 global, DESIGN.md §1):
  * paper: Nv=576 (24x24 ViT-L/14-336 tokens), batch sweep 1..256;
  * high-res: Nv=2304, 2880, at B=64 and B=4;
  * video: Nv=36864, B=1..4.
``--quick``: paper B=256 and B=4, high-res Nv=2880 B=64, video B=1. ``--smoke``: tiny, CPU.

    python benchmarks/bench_partial_global.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from attention_common import attention_case, attention_providers  # noqa: E402

import pargo_kernels as pk  # noqa: E402
from pargo_kernels.masks import PartialGlobalMask  # noqa: E402

H, D, NP, NG = 8, 64, 288, 16
PAPER_NV, HIRES_NV, VIDEO_NV = 576, (2304, 2880), 36864
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def shapes(args):
    """(name, group, B, H, D, Np, Ng, Nv), most important first (the time budget cuts the tail).
    The first case of a group is where FlexAttention's block size is chosen."""
    if args.smoke:
        return [("paper-B2", "paper", 2, 2, 16, 8, 4, 16),
                ("hires-Nv40-B1", "hires", 1, 2, 16, 8, 4, 40)]
    if args.quick:
        return [("paper-B256", "paper", 256, H, D, NP, NG, PAPER_NV),
                ("paper-B4", "paper", 4, H, D, NP, NG, PAPER_NV),
                (f"hires-Nv{HIRES_NV[1]}-B64", "hires", 64, H, D, NP, NG, HIRES_NV[1]),
                (f"video-Nv{VIDEO_NV}-B1", "video", 1, H, D, NP, NG, VIDEO_NV)]
    out = [("paper-B256", "paper", 256, H, D, NP, NG, PAPER_NV)]
    out += [(f"hires-Nv{nv}-B64", "hires", 64, H, D, NP, NG, nv) for nv in reversed(HIRES_NV)]
    out += [(f"video-Nv{VIDEO_NV}-B4", "video", 4, H, D, NP, NG, VIDEO_NV)]
    out += [(f"paper-B{b}", "paper", b, H, D, NP, NG, PAPER_NV) for b in BATCHES[:-1]]
    out += [(f"hires-Nv{nv}-B4", "hires", 4, H, D, NP, NG, nv) for nv in HIRES_NV]
    out += [(f"video-Nv{VIDEO_NV}-B{b}", "video", b, H, D, NP, NG, VIDEO_NV) for b in (1, 2, 3)]
    return out


def op(q, k, v, case, backend):
    return pk.partial_global_attention(q, k, v, case.config["Np"], backend=backend)


def make_case(shape, args):
    """The benchmark case of one ``shapes()`` entry."""
    name, group, B, h, d, np_, ng, nv = shape
    mask = PartialGlobalMask(np_ + ng, nv, np_)
    return attention_case("partial_global", name, group, mask, B, h, d, d, args,
                          extra=dict(Np=np_, Ng=ng))


def plan(args) -> list:
    """``(make_case, providers)`` per case, most important first (benchmarks/gpu_plan.py reads
    it too)."""
    providers = common.selected(attention_providers(args, op), args)
    return [(lambda s=shape: make_case(s, args), providers) for shape in shapes(args)]


def main(argv=None) -> int:
    args, rec = common.start("partial_global", __doc__.splitlines()[1], argv)
    common.run_cases(plan(args), rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
