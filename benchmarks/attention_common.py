"""Attention cases and providers shared by ``bench_partial_global.py`` and ``bench_band.py``.

Providers (each only where available; the others are recorded ``n/a (reason)``):

* ``ours[triton]``, ``ours[cuda]``: the package's op pinned to that backend (a refusal of the
  dispatcher is recorded with its reason); ``ours[reference]`` only in ``--smoke``.
* ``pargo-eager``: the official ParGo path, a BERT-style eager layer: ``q @ k^T / sqrt(D)`` plus a
  dense additive ``0 / -inf`` mask ``[B, 1, Nq, Nv]`` (repeated over the batch, built before
  timing, so its construction is not counted; its size is the row's ``aux_mb``), softmax,
  ``@ v``, all in the input dtype.
* ``sdpa[flash|efficient|cudnn|math]``: ``F.scaled_dot_product_attention`` with the dense
  boolean mask ``[1, 1, Nq, Nv]``, pinned to one SDPA backend with ``sdpa_kernel``; the note says
  which backend the unpinned dispatcher would pick.
* ``flex``: ``torch.compile(flex_attention)`` with a BlockMask from an interval ``mask_mod`` (two
  index vectors, so no mask tensor is read in the kernel); BLOCK_SIZE is the best of
  ``FLEX_BLOCK_SIZES`` by fwd+bwd time on the first case of each group, then reused in the group
  (the note says so).
* ``xformers``, ``flash-attn``: only if importable (not on the lent GPU machine).
* ``wrong[shifted-mask]`` (``--inject-wrong``): the reference with the mask shifted by one key; it
  must be reported WRONG, which proves the correctness gate can fail.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common import (PROVIDER_SECONDS, REF_CHUNK_ELEMS, Case, NotAvailable, Provider,
                    backend_refusals_as_not_available, bench, chunked_reference)
from pargo_kernels.reference import masked_attention

FLEX_BLOCK_SIZES = (128, 64)
FLEX_BUDGET_SHARE = 0.35  # flex stops (n/a, reason given) once its calls took this much budget
# Budget a FlexAttention case needs left before it starts: its first call compiles (torch.compile
# of the forward and the backward, once per block mask / shape), and that compile counts against
# the script's budget. An assumed upper bound for one H200 compile (not measured: no GPU has run
# this yet); common.run_case records a case with less budget left SKIPPED rather than start it.
FLEX_COMPILE_S = 40.0
_SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def attention_case(op: str, name: str, group: str, mask, B: int, H: int, D: int, Dv: int,
                   args, extra: Optional[dict] = None) -> Case:
    """A case for an attention op of the package described by ``mask`` (a masks.* object)."""
    dev, dt = args.device, args.dtype_t
    Nq, Nv = mask.n_query, mask.n_key
    scale = D ** -0.5
    dense = mask.materialize(dev)
    nnz = int(dense.sum().item())
    e = dt.itemsize
    bh = B * H
    fwd_bytes = e * bh * (Nq * D + Nv * D + Nv * Dv + Nq * Dv)
    # backward reads q, k, v, o, do and the fp32 row statistics; writes dq, dk, dv
    bwd_bytes = e * bh * (2 * (Nq * D + Nv * D + Nv * Dv) + 2 * Nq * Dv) + 4 * bh * Nq
    fwd_flops = 2 * (D + Dv) * nnz * bh
    bwd_flops = int(2.5 * fwd_flops)  # FlashAttention convention: S recomputed, 5 matmuls

    def make_inputs():
        return [torch.randn(B, H, n, d, device=dev, dtype=torch.float32).to(dt).requires_grad_()
                for n, d in ((Nq, D), (Nv, D), (Nv, Dv))]

    chunk = max(1, REF_CHUNK_ELEMS // (Nq * Nv))

    def reference(inputs, grad_out, ref_dtype, need_grad):
        return chunked_reference(lambda q, k, v: masked_attention(q, k, v, dense, scale),
                                 inputs, grad_out, ref_dtype, need_grad, lead=2, chunk=chunk)

    config = dict(B=B, H=H, Nq=Nq, Nv=Nv, D=D, Dv=Dv, dtype=args.dtype, nnz=nnz,
                  density=round(nnz / (Nq * Nv), 4), **(extra or {}))
    return Case(op=op, name=name, group=group, config=config, make_inputs=make_inputs,
                out_shape=(B, H, Nq, Dv), reference=reference,
                bytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
                flops={"fwd": fwd_flops, "bwd": bwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
                ref_elems=bh * Nq * Nv,
                extra=dict(mask=mask, dense=dense, scale=scale, **(extra or {})))


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------
def ours(backend: str, op: Callable) -> Provider:
    """``op(q, k, v, case, backend)`` calls the package's public function."""
    def setup(case):
        def fn(q, k, v):
            with backend_refusals_as_not_available():
                return op(q, k, v, case, backend)
        return fn
    return Provider(f"ours[{backend}]", setup)


def pargo_eager() -> Provider:
    def setup(case):
        q_shape = case.config
        dense, scale = case.extra["dense"], case.extra["scale"]
        B, dt = q_shape["B"], _dtype(case)
        additive = torch.zeros(dense.shape, device=dense.device, dtype=dt)
        additive = additive.masked_fill(~dense, float("-inf"))[None, None].repeat(B, 1, 1, 1)
        D = q_shape["D"]
        use_sqrt = abs(scale - D ** -0.5) < 1e-12

        def fn(q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2))
            s = s / math.sqrt(D) if use_sqrt else s * scale
            s = s + additive
            p = torch.softmax(s, dim=-1)
            return torch.matmul(p, v)
        return fn
    return Provider("pargo-eager", setup,
                    note=lambda case: "dense additive mask [B,1,Nq,Nv] built before timing")


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa_auto_choice(case) -> str:
    try:
        from torch.nn.attention import SDPBackend
        c = case.config
        dev, dt = case.extra["dense"].device, _dtype(case)
        q = torch.empty(1, c["H"], c["Nq"], c["D"], device=dev, dtype=dt)
        k = torch.empty(1, c["H"], c["Nv"], c["D"], device=dev, dtype=dt)
        v = torch.empty(1, c["H"], c["Nv"], c["Dv"], device=dev, dtype=dt)
        idx = torch._fused_sdp_choice(q, k, v, case.extra["dense"][None, None], 0.0, False,
                                      scale=case.extra["scale"])
        names = {m.value if hasattr(m, "value") else int(m): n
                 for n, m in SDPBackend.__members__.items()}
        return names.get(int(idx), str(idx)).lower()
    except Exception as exc:  # private API: best effort
        return f"unknown ({type(exc).__name__})"


def sdpa(backend: str) -> Provider:
    def setup(case):
        try:
            from torch.nn.attention import sdpa_kernel
        except ImportError as exc:
            raise NotAvailable("torch.nn.attention.sdpa_kernel missing") from exc
        be = _sdpa_backend_enum(backend)
        mask = case.extra["dense"][None, None]
        scale = case.extra["scale"]

        def fn(q, k, v):
            try:
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            except RuntimeError as exc:
                msg = str(exc)
                if "No available kernel" in msg or "No viable backend" in msg:
                    raise NotAvailable(f"sdpa backend {backend} does not support this input"
                                       ) from exc
                raise
        return fn
    return Provider(f"sdpa[{backend}]", setup,
                    note=lambda case: f"bool mask [1,1,Nq,Nv]; unpinned dispatch picks "
                                      f"{_sdpa_auto_choice(case)}")


def _interval_bounds(dense: torch.Tensor):
    """(lo, hi) int32 per query row if every row's allowed keys form one interval, else None."""
    n_key = dense.shape[1]
    idx = torch.arange(n_key, device=dense.device)
    lo = torch.where(dense, idx, n_key).amin(1)
    hi = torch.where(dense, idx + 1, 0).amax(1)
    if not bool((dense.sum(1) == hi - lo).all()):
        return None
    return lo.to(torch.int32), hi.to(torch.int32)


_FLEX_STATE: dict = {}


def flex_functions(compiled: bool):
    """``(create_block_mask, flex_attention)``, the latter ``torch.compile``d once per process
    if ``compiled`` (recompile limits raised: every mask / shape of a sweep compiles anew);
    :class:`NotAvailable` if this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise NotAvailable("torch.nn.attention.flex_attention missing") from exc
    if "fn" not in _FLEX_STATE:
        _raise_recompile_limits()
        _FLEX_STATE["fn"] = torch.compile(flex_attention) if compiled else flex_attention
    return create_block_mask, _FLEX_STATE["fn"]


def flex(args) -> Provider:
    """Compiled FlexAttention (eager, unfused, in --smoke: CPU has no time for compiles)."""
    compile_it = not args.smoke

    def setup(case):
        create_block_mask, flex_fn = flex_functions(compile_it)
        spent = PROVIDER_SECONDS.get("flex", 0.0)
        if args.budget_s is not None and spent > FLEX_BUDGET_SHARE * args.budget_s:
            raise NotAvailable(f"flex time cap reached ({spent:.0f} s of compiles and timing "
                               f"> {FLEX_BUDGET_SHARE:.0%} of this script's budget)")
        dense, scale = case.extra["dense"], case.extra["scale"]
        bounds = _interval_bounds(dense)
        if bounds is not None:
            lo, hi = bounds

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return dense[q_idx, kv_idx]
        Nq, Nv = dense.shape

        def make(bs):
            # one BlockMask (and mask_mod) per mask and block size, reused across batch sizes
            # (B=None broadcasts), so a batch sweep does not recompile for a new mask function
            key = ("bm", case.extra["mask"], str(dense.device), bs)
            if key not in _FLEX_STATE:
                _FLEX_STATE[key] = create_block_mask(mask_mod, None, None, Nq, Nv,
                                                     device=str(dense.device), BLOCK_SIZE=bs)
            bm = _FLEX_STATE[key]
            return lambda q, k, v: flex_fn(q, k, v, block_mask=bm, scale=scale)

        sizes = tuple(FLEX_BLOCK_SIZES if not args.quick else FLEX_BLOCK_SIZES[:1])
        chosen = _FLEX_STATE.get(("bs", case.group))
        if chosen is None:
            chosen, why = _pick_block_size(make, sizes, case, args)
            _FLEX_STATE[("bs", case.group)] = chosen
            _FLEX_STATE[("why", case.group)] = why
        return make(chosen)

    def note(case):
        bs = _FLEX_STATE.get(("bs", case.group))
        why = _FLEX_STATE.get(("why", case.group), "")
        kind = "compiled" if compile_it else "eager (unfused, smoke)"
        return f"{kind}; BLOCK_SIZE={bs} {why}".strip()
    def no_backward(case, a):
        if case.extra["dense"].device.type == "cpu":
            return "FlexAttention has no CPU backward"
        return None
    return Provider("flex", setup, note=note, no_backward=no_backward,
                    min_left_s=FLEX_COMPILE_S if compile_it else 0.0)


def _pick_block_size(make, sizes, case, args):
    if len(sizes) == 1 or args.smoke:
        return sizes[0], f"(only {sizes[0]} tried)"
    times, errors = {}, {}
    inputs = case.make_inputs()
    g = torch.randn(case.out_shape, device=args.device, dtype=torch.float32).to(args.dtype_t)
    for bs in sizes:
        try:
            fn = make(bs)

            def call():
                fn(*inputs).backward(g)
            call()  # compile
            times[bs] = bench(call, args, grad_to_none=inputs)[0]
        except Exception as exc:
            errors[bs] = type(exc).__name__
    if not times:
        raise RuntimeError(f"flex failed for every BLOCK_SIZE {sizes}: {errors}")
    best = min(times, key=times.get)
    shown = ", ".join(f"{bs}: {t:.3f} ms" for bs, t in times.items())
    shown += "".join(f", {bs}: {err}" for bs, err in errors.items())
    return best, f"(best fwd+bwd of {{{shown}}} on {case.name}, reused in group {case.group!r})"


def _raise_recompile_limits():
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 256))


def xformers_provider() -> Provider:
    def setup(case):
        try:
            import xformers.ops as xops
        except Exception as exc:
            raise NotAvailable(f"not installed ({type(exc).__name__})") from exc
        dense, scale, c = case.extra["dense"], case.extra["scale"], case.config
        Nq, Nv = dense.shape
        pad = -(-Nv // 8) * 8  # xformers wants the bias's last dim 8-aligned in memory
        bias = torch.zeros(1, 1, Nq, pad, device=dense.device, dtype=_dtype(case))
        bias[..., :Nv].masked_fill_(~dense, float("-inf"))
        bias = bias[..., :Nv].expand(c["B"], c["H"], Nq, Nv)

        def fn(q, k, v):
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), attn_bias=bias, scale=scale)
            return out.transpose(1, 2)
        return fn
    return Provider("xformers", setup, note=lambda case: "tensor attn_bias (dense, broadcast)")


def flash_attn_provider() -> Provider:
    def setup(case):
        try:
            from flash_attn import flash_attn_func
        except Exception as exc:
            raise NotAvailable(f"not installed ({type(exc).__name__})") from exc
        window = case.extra.get("window")
        if window is None:
            raise NotAvailable("flash-attn has no arbitrary masks (only causal / local windows)")
        scale = case.extra["scale"]

        def fn(q, k, v):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  softmax_scale=scale, window_size=tuple(window))
            return out.transpose(1, 2)
        return fn
    return Provider("flash-attn", setup, note=lambda case: "native window_size")


def wrong_provider() -> Provider:
    def setup(case):
        dense = torch.roll(case.extra["dense"], 1, dims=1)  # every window shifted by one key
        scale = case.extra["scale"]
        return lambda q, k, v: masked_attention(q, k, v, dense, scale)
    return Provider("wrong[shifted-mask]", setup,
                    note=lambda case: "deliberately wrong: mask shifted by one key")


def _dtype(case) -> torch.dtype:
    from common import DTYPES
    return DTYPES[case.config["dtype"]]


def attention_providers(args, op: Callable) -> list:
    provs = []
    if args.smoke:
        provs.append(ours("reference", op))
    provs += [ours("triton", op), ours("cuda", op), pargo_eager()]
    provs += [sdpa(b) for b in _SDPA_BACKENDS]
    provs += [flex(args), xformers_provider(), flash_attn_provider()]
    if args.inject_wrong:
        provs.append(wrong_provider())
    return provs
