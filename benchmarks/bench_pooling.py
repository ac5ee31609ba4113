"""Benchmark: DeCo adaptive average pooling of tokens fused with the projection.

Shapes (B=256, projected to 4096): 24x24 -> 12x12 with C=1024 (CLIP ViT-L/14-336) and
27x27 -> 12x12 with C=1152 (SigLIP, overlapping windows). ``--quick``: the first only.
``--smoke``: tiny, CPU.

Providers: ``ours[triton]`` / ``ours[cuda]`` (``adaptive_avg_pool_project`` as it runs by
default: the pooling kernel, then ``F.linear``), ``ours-fused[triton]`` (``fused=True``: the
fused pool + GEMM kernel), ``deco-eager`` (the
DeCo path: tokens -> ``[B, C, H, W]`` view, ``nn.AdaptiveAvgPool2d``, back, ``nn.Linear``) and
``deco-compiled`` (``torch.compile`` of it; skipped in --smoke). The reference is
``F.adaptive_avg_pool2d`` + ``F.linear`` in float64.

The package's pooling ops are imported lazily; if they are not importable the benchmark is
skipped with the reason (``--allow-missing-ours`` runs the baselines anyway).

    python benchmarks/bench_pooling.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Case, NotAvailable, Provider  # noqa: E402

B, N_OUT = 256, 4096
COMPILE_S = 30.0  # budget deco-compiled needs left to start (its torch.compile; assumed)
# (name, B, (Hin, Win), (Hout, Wout), C, N): DeCo on CLIP ViT-L/14-336, and SigLIP (overlapping
# windows); also the cases of benchmarks/work_model_pool.py and test_bench_ops.py
SHAPES = [(f"pool-24to12-C1024-N{N_OUT}-B{B}", B, (24, 24), (12, 12), 1024, N_OUT),
          (f"pool-27to12-C1152-N{N_OUT}-B{B}", B, (27, 27), (12, 12), 1152, N_OUT)]


def shapes(args):
    """(name, B, (Hin, Win), (Hout, Wout), C, N)."""
    if args.smoke:
        return [("pool-6to3-C16-N32-B2", 2, (6, 6), (3, 3), 16, 32),
                ("pool-7to3-C8-N24-B2", 2, (7, 7), (3, 3), 8, 24)]
    return SHAPES[:1] if args.quick else SHAPES


def deco_path(x, weight, bias, in_grid, out_grid):
    """The DeCo projector as its code runs it: rearrange 'b (h w) c -> b c h w',
    AdaptiveAvgPool2d, rearrange back, Linear (here with the benchmark's weight and bias)."""
    b, _, c = x.shape
    img = x.transpose(1, 2).reshape(b, c, *in_grid)
    pooled = torch.nn.AdaptiveAvgPool2d(out_grid)(img)
    tokens = pooled.flatten(2).transpose(1, 2)
    return F.linear(tokens, weight, bias)


def pooling_case(name, b, in_grid, out_grid, c, n, args) -> Case:
    dev, dt = args.device, args.dtype_t
    e = dt.itemsize
    m_in, m_out = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]

    def make_inputs():
        x = torch.randn(b, m_in, c, device=dev, dtype=torch.float32)
        w = torch.randn(n, c, device=dev, dtype=torch.float32) * c ** -0.5
        bias = torch.randn(n, device=dev, dtype=torch.float32)
        return [t.to(dt).requires_grad_() for t in (x, w, bias)]

    def reference(inputs, grad_out, ref_dtype, need_grad):
        leaves = [t.detach().to(ref_dtype).requires_grad_(need_grad) for t in inputs]
        with torch.set_grad_enabled(need_grad):
            x, w, bias = leaves
            img = x.transpose(1, 2).reshape(b, c, *in_grid)
            out = F.linear(F.adaptive_avg_pool2d(img, out_grid).flatten(2).transpose(1, 2), w, bias)
        if not need_grad:
            return out.detach(), [None] * 3
        out.backward(grad_out.to(ref_dtype))
        return out.detach(), [t.grad for t in leaves]

    gemm = 2 * b * m_out * c * n
    fwd_bytes = e * (b * m_in * c + n * c + n + b * m_out * n)
    # backward reads dout, x (to rebuild the pooled rows for dW) and W; writes dx, dW, db
    bwd_bytes = e * (b * m_out * n + b * m_in * c + n * c + b * m_in * c + n * c + n)
    config = dict(B=b, in_grid=list(in_grid), out_grid=list(out_grid), C=c, N=n, dtype=args.dtype)
    return Case(op="pooling", name=name, group="pooling", config=config, make_inputs=make_inputs,
                out_shape=(b, m_out, n), reference=reference,
                bytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
                flops={"fwd": gemm + b * m_in * c, "bwd": 2 * gemm + b * m_in * c,
                       "fwd+bwd": 3 * gemm + 2 * b * m_in * c},
                ref_elems=0, extra=dict(in_grid=in_grid, out_grid=out_grid))


def ours(backend, pk_ops, fused=None) -> Provider:
    """``adaptive_avg_pool_project``: ``fused=None`` its default path, ``True`` the fused one."""
    def setup(case):
        if pk_ops is None:
            raise NotAvailable("pargo_kernels pooling ops not importable")
        ig, og = case.extra["in_grid"], case.extra["out_grid"]

        def fn(x, w, bias):
            with common.backend_refusals_as_not_available():
                return pk_ops.adaptive_avg_pool_project(x, w, bias, in_grid=ig, out_grid=og,
                                                        backend=backend, fused=fused)
        return fn
    name = f"ours-fused[{backend}]" if fused else f"ours[{backend}]"
    return Provider(name, setup, note=lambda case: "fused pool+GEMM kernel" if fused else
                    "default: pool kernel, then F.linear")


def deco(compiled: bool, args) -> Provider:
    state = {}

    def setup(case):
        ig, og = tuple(case.extra["in_grid"]), tuple(case.extra["out_grid"])
        if not compiled:
            return lambda x, w, bias: deco_path(x, w, bias, ig, og)
        if args.smoke:
            raise NotAvailable("torch.compile skipped in --smoke (CPU)")
        if "fn" not in state:
            state["fn"] = torch.compile(deco_path)
        fn = state["fn"]
        return lambda x, w, bias: fn(x, w, bias, ig, og)
    return Provider("deco-compiled" if compiled else "deco-eager", setup,
                    note=lambda case: "torch.compile (default mode)" if compiled else
                    "[B,C,H,W] view, AdaptiveAvgPool2d, Linear",
                    min_left_s=COMPILE_S if compiled and not args.smoke else 0.0)


def wrong() -> Provider:
    def setup(case):
        ig, og = tuple(case.extra["in_grid"]), tuple(case.extra["out_grid"])
        # deliberately wrong: tokens rolled by one position before pooling
        return lambda x, w, bias: deco_path(torch.roll(x, 1, dims=1), w, bias, ig, og)
    return Provider("wrong[rolled-tokens]", setup,
                    note=lambda case: "deliberately wrong: tokens rolled by one")


def providers(args, pk_ops) -> list:
    provs = [ours("reference", pk_ops)] if args.smoke else []
    provs += [ours("triton", pk_ops), ours("cuda", pk_ops), ours("triton", pk_ops, fused=True),
              deco(False, args), deco(True, args)]
    if args.inject_wrong:
        provs.append(wrong())
    return provs


def import_ours():
    try:
        import pargo_kernels as pk
        pk.adaptive_avg_pool_tokens, pk.adaptive_avg_pool_project  # noqa: B018
        return pk, None
    except (ImportError, AttributeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--allow-missing-ours", action="store_true",
                       help="run the baselines even if the package's pooling ops are missing")
    args, rec = common.start("pooling", __doc__.splitlines()[1], argv, extra)
    pk_ops, why = import_ours()
    if pk_ops is None:
        msg = f"pargo_kernels.adaptive_avg_pool_tokens/_project not importable ({why})"
        rec.meta["unavailable"]["ours"] = msg
        if not args.allow_missing_ours:
            print(f"[pooling] SKIPPED: {msg}", flush=True)
            rec.meta["skipped"] = msg
            rec.write_meta()
            return 0
        print(f"[pooling] {msg}: running the baselines only", flush=True)
        rec.write_meta()
    common.run_cases(plan(args, pk_ops), rec, args)
    return 0


def plan(args, pk_ops=None) -> list:
    """``(make_case, providers)`` per case, in ``shapes`` order (``pk_ops``: the package, or
    None when it is not importable)."""
    provs = common.selected(providers(args, pk_ops), args)
    return [(lambda s=s: pooling_case(*s, args), provs) for s in shapes(args)]


if __name__ == "__main__":
    sys.exit(main())
