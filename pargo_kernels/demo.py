"""`python -m pargo_kernels.demo`: the ParGo ops on the paper's shape, checked against the
float64 oracle, on whatever this machine has (GPU: compiled Triton; CPU: Triton interpreter)."""
from __future__ import annotations

import os
import time

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pargo_kernels as pk  # noqa: E402
from pargo_kernels.masks import BandMask, PartialGlobalMask, ascii_mask  # noqa: E402
from pargo_kernels.reference import masked_attention  # noqa: E402
from pargo_kernels.testing import rel_error  # noqa: E402


def _case(name, fn, mask, B, H, D, dtype, device):
    q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=True)
               for n in (mask.n_query, mask.n_key, mask.n_key))
    t0 = time.perf_counter()
    out = fn(q, k, v)
    out.backward(g := torch.randn_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = masked_attention(*leaves, mask.materialize(device), D ** -0.5)
    ref.backward(g.double())
    errs = [rel_error(out, ref)] + [rel_error(x.grad, r.grad) for x, r in zip((q, k, v), leaves)]
    line = (f"{name:<34} {str(dtype).replace('torch.', ''):<9} B={B:<3} H={H} D={D}  "
            "rel err out/dq/dk/dv: " + " ".join(f"{e:.1e}" for e in errs))
    if device == "cuda":
        line += f"   ({took:.2f}s incl. first compile)"
    print(line)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"pargo_kernels {pk.__version__} on {where}\n")
    print("Partial-global mask, Np=4 partial + Ng=2 global queries over Nv=8 keys:")
    print(ascii_mask(PartialGlobalMask(6, 8, 4).materialize()))
    print("\nCascade windows for 288 partial queries, 6 layers:", pk.cascade_windows(288, 6))
    print("\nTriton kernels vs the float64 oracle (fresh random inputs):")
    B = 256 if device == "cuda" else 1
    dtype = torch.bfloat16
    _case("partial-global 288+16 x 576", lambda q, k, v: pk.partial_global_attention(
        q, k, v, 288, backend="triton"), PartialGlobalMask(304, 576, 288), B, 8 if B > 1 else 2,
        64, dtype, device)
    _case("partial-global 2-D 12x12 of 24x24", lambda q, k, v: pk.partial_global_attention(
        q, k, v, 144, visual_grid=(24, 24), partial_grid=(12, 12), backend="triton"),
        PartialGlobalMask(160, 576, 144, (24, 24), (12, 12)), B, 8 if B > 1 else 2, 64, dtype,
        device)
    for layer, window in enumerate(pk.cascade_windows(288, 6)[:2], 1):
        _case(f"band layer {layer} window {window}", lambda q, k, v, w=window: pk.band_attention(
            q, k, v, w, backend="triton"), BandMask(288, *window), B, 8 if B > 1 else 2, 64, dtype,
            device)
    print("\nTimings: see benchmarks/ (only GPU numbers are reported).")


if __name__ == "__main__":
    main()
