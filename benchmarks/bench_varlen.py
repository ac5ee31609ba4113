"""Benchmark: packed (varlen) dynamic-resolution batches: our varlen ops against padding every
image to the largest grid (dense masked SDPA) and FlexAttention with a document-aware mask.

The batch (``batch_grids``): 64 images whose grids (rows, cols) are drawn independently from
16..48 (a fixed draw, ``GRID_SEED``, so every run times the same batch; the inputs are fresh
random tensors every run) and 4 videos of 16 frames at 24x24 (a frame is one image: one
sequence). ParGo shape: H=8, D=Dv=64, bf16. Per image, by the rule of ``partial_grid``: the
partial grid keeps the paper's 24x24 -> 18x16 ratio, ``(max(1, 3h // 4), max(1, 2w // 3))``,
partial query i of image s sees the 2-D window of its cell; 16 global queries per image see
all of the image's keys. Cases:

* ``pg-*``: ``partial_global_attention_varlen`` (cross-attention, 2-D windows);
* ``band-*``: ``band_attention_varlen`` over the partial queries of every image (ParGo's
  self-attention bands), window ``BAND_WINDOW`` (the first of ``cascade_windows(288, 6,
  "symmetric")``);
* ``pool-*``: ``adaptive_avg_pool_tokens_varlen`` (DeCo), C=1024, image ``s`` pooled from
  ``(h, w)`` to ``(max(1, h // 2), max(1, w // 2))``.

``*-half`` is the same draw with half the images and videos (32 + 2): total_q x total_k grows
about 4x from half to full, so the memory figures show what grows with it.

Providers (attention; every one returns the packed ``[total_q, H, Dv]`` and is checked against
the per-image float64 reference on the unpadded tokens before it is timed):

* ``ours[triton]``: the op with a plan built beforehand (``plan_partial_global`` /
  ``plan_band``): the kernels alone; ``ours[triton]+plan``: the op given ``cu_seqlens`` and the
  grids as Python lists, so every call builds its O(#images) plan;
* ``sdpa-padded``: every image padded to the largest (Nq, Nv), a bool mask
  ``[n_img, 1, Nq_max, Nv_max]`` materialised (as the official ParGo code does) once before
  timing, ``F.scaled_dot_product_attention`` (unpinned dispatch; the note says which backend);
  timed including the scatter into and gather out of the padded layout;
  ``sdpa-padded+mask``: the same, the mask (and the pad indices) built on the device in every
  call;
* ``flex``: compiled ``flex_attention`` on the packed tokens as one sequence, BlockMask from a
  document-aware ``mask_mod`` (sequence ids + every query's window: flat key interval and, for
  2-D windows, a column interval), built once before timing; ``flex+mask``: per-token index
  vectors and ``create_block_mask`` (``_compile=True``) in every call;
* ``ours[reference]`` (``--smoke`` only) and ``wrong[rolled-keys]`` (``--inject-wrong``: keys
  rolled by one token, must come out WRONG).

Pooling: ``ours[triton]``, ``ours[triton]+plan``, ``per-image-loop`` (``F.adaptive_avg_pool2d``
image by image, then ``torch.cat``); no Flex / padding (padding changes the pooling windows).

After the cases, ``ratios()`` computes (does not assert) the issue's goals: Flex time over ours
(kernels alone, and both including mask / plan construction), padded over ours, and each
provider's extra memory from ``*-half`` to full beside the growth of total_q x total_k; they
are printed and stored in the script's meta (``ratios``), which ``run_all.py`` carries into the
merged JSON. ``--smoke``: two tiny batches on CPU (Triton only under ``TRITON_INTERPRET=1``;
Flex forward only, eager, if this torch has it).

    python benchmarks/bench_varlen.py [--quick] [--out DIR] [--budget-s S]
"""
from __future__ import annotations

import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import attention_common  # noqa: E402
from attention_common import flex_functions  # noqa: E402
from common import Case, NotAvailable, Provider  # noqa: E402

import pargo_kernels as pk  # noqa: E402
from pargo_kernels.masks import BandMask, PartialGlobalMask  # noqa: E402
from pargo_kernels.reference import masked_attention  # noqa: E402
from pargo_kernels.varlen_plan import plan_band, plan_partial_global, plan_pool  # noqa: E402

H, D, NG, POOL_C = 8, 64, 16, 1024
N_IMAGES, GRID_RANGE, N_VIDEOS, FRAMES, FRAME_GRID = 64, (16, 48), 4, 16, (24, 24)
BAND_WINDOW = (24, 23)
GRID_SEED = 0  # fixes the batch composition only; input values are fresh every run


def partial_grid(grid) -> tuple[int, int]:
    """ParGo's partial grid for an image grid: the paper's 24x24 -> 18x16 ratio, at least 1x1."""
    h, w = grid
    return max(1, 3 * h // 4), max(1, 2 * w // 3)


def pooled_grid(grid) -> tuple[int, int]:
    return max(1, grid[0] // 2), max(1, grid[1] // 2)


def batch_grids(smoke: bool, half: bool) -> list[tuple[int, int]]:
    """Visual grids of the batch: images first, then the video frames."""
    rng = random.Random(GRID_SEED)
    if smoke:
        n_img, lo_hi, n_vid, frames, frame = 3, (1, 5), 1, 2, (3, 2)
    else:
        n_img, lo_hi, n_vid, frames, frame = N_IMAGES, GRID_RANGE, N_VIDEOS, FRAMES, FRAME_GRID
    imgs = [(rng.randint(*lo_hi), rng.randint(*lo_hi)) for _ in range(n_img)]
    if half:
        imgs, n_vid = imgs[: max(1, n_img // 2)], max(1, n_vid // 2)
    return imgs + [frame] * (n_vid * frames)


def offsets(lengths) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


# --------------------------------------------------------------------------------------------
# attention cases
# --------------------------------------------------------------------------------------------
class Packed:
    """One packed attention problem: per-sequence lengths, masks and window parameters."""

    def __init__(self, op: str, grids, head_dim: int):
        self.op, self.grids = op, list(grids)
        if op == "partial_global":
            self.pgrids = [partial_grid(g) for g in self.grids]
            self.np = [a * b for a, b in self.pgrids]
            self.nq = [n + NG for n in self.np]
            self.nv = [a * b for a, b in self.grids]
            self.masks = [PartialGlobalMask(nq, nv, np_, g, pg) for nq, nv, np_, g, pg in
                          zip(self.nq, self.nv, self.np, self.grids, self.pgrids)]
        else:  # band over every image's partial queries
            self.nq = self.nv = [a * b for a, b in (partial_grid(g) for g in self.grids)]
            self.masks = [BandMask(n, *BAND_WINDOW) for n in self.nq]
        self.cu_q, self.cu_k = offsets(self.nq), offsets(self.nv)
        self.scale = head_dim ** -0.5

    @property
    def n_seq(self) -> int:
        return len(self.nq)

    def plan(self, device, split_keys=None):
        if self.op == "partial_global":
            return plan_partial_global(self.cu_q, self.cu_k, self.np, visual_grids=self.grids,
                                       partial_grids=self.pgrids, device=device,
                                       split_keys=split_keys)
        return plan_band(self.cu_q, device=device)

    def run_ours(self, q, k, v, backend, plan=None):
        if self.op == "partial_global":
            if plan is not None:
                return pk.partial_global_attention_varlen(q, k, v, plan=plan, backend=backend)
            return pk.partial_global_attention_varlen(
                q, k, v, self.cu_q, self.cu_k, self.np, visual_grids=self.grids,
                partial_grids=self.pgrids, backend=backend)
        if plan is not None:
            return pk.band_attention_varlen(q, k, v, window=BAND_WINDOW, plan=plan,
                                            backend=backend)
        return pk.band_attention_varlen(q, k, v, self.cu_q, BAND_WINDOW, backend=backend)

    # windows as per-token index vectors, built on the device from O(#sequences) numbers
    def windows(self, device) -> dict:
        """Per query token: sequence id, local row, key interval ``[lo, hi)`` in packed key
        coordinates and column interval ``[x0, x1)``; per key token: sequence id, local index
        and column (``j % Wv``; 0 for 1-D windows)."""
        def t(vals):
            return torch.tensor(vals, dtype=torch.int64, device="cpu").to(device, non_blocking=True)

        nq, nv = t(self.nq), t(self.nv)
        tq, tk = self.cu_q[-1], self.cu_k[-1]
        seq_q = torch.repeat_interleave(torch.arange(self.n_seq, device=device), nq,
                                        output_size=tq)
        seq_k = torch.repeat_interleave(torch.arange(self.n_seq, device=device), nv,
                                        output_size=tk)
        row = torch.arange(tq, device=device) - t(self.cu_q[:-1])[seq_q]
        key = torch.arange(tk, device=device) - t(self.cu_k[:-1])[seq_k]
        n_k = nv[seq_q]
        big = torch.full_like(row, 2**30)
        if self.op == "partial_global":
            hv, wv = (t([g[i] for g in self.grids]) for i in (0, 1))
            hp, wp = (t([g[i] for g in self.pgrids]) for i in (0, 1))
            npart = t(self.np)[seq_q]
            Hv, Wv, hp_q, wp_q = hv[seq_q], wv[seq_q], hp[seq_q], wp[seq_q]
            r, c = row // wp_q, row % wp_q
            part = row < npart
            lo = torch.where(part, (r * Hv) // hp_q * Wv, 0)
            hi = torch.where(part, ((r + 1) * Hv + hp_q - 1) // hp_q * Wv, n_k)
            x0 = torch.where(part, (c * Wv) // wp_q, 0)
            x1 = torch.where(part, ((c + 1) * Wv + wp_q - 1) // wp_q, big)
            kcol = key % wv[seq_k]
        else:
            left, right = BAND_WINDOW
            lo = (row - left).clamp_min(0)
            hi = torch.minimum(row + right + 1, n_k)
            x0, x1, kcol = torch.zeros_like(row), big, torch.zeros_like(key)
        k0 = t(self.cu_k[:-1])[seq_q]
        return dict(seq_q=seq_q, row=row, lo=lo, hi=hi, x0=x0, x1=x1, lo_g=lo + k0,
                    hi_g=hi + k0, seq_k=seq_k, key=key, kcol=kcol)

    def padded_mask(self, w: dict, device):
        """Bool mask ``[n_seq, 1, Nq_max, Nv_max]`` and the (sequence, row) pad indices of the
        queries and keys; padded query rows see key 0 only (their output is discarded)."""
        nq_max, nv_max = max(self.nq), max(self.nv)
        full = dict(lo=0, hi=1, x0=0, x1=2**30)
        rows = {name: torch.full((self.n_seq, nq_max), val, dtype=torch.int64, device=device)
                for name, val in full.items()}
        for name in rows:
            rows[name][w["seq_q"], w["row"]] = w[name]
        kcol = torch.zeros((self.n_seq, nv_max), dtype=torch.int64, device=device)
        kcol[w["seq_k"], w["key"]] = w["kcol"]
        j = torch.arange(nv_max, device=device)[None, None, :]
        kc = kcol[:, None, :]
        mask = ((j >= rows["lo"][..., None]) & (j < rows["hi"][..., None])
                & (kc >= rows["x0"][..., None]) & (kc < rows["x1"][..., None]))
        return mask[:, None], (w["seq_q"], w["row"]), (w["seq_k"], w["key"])


def attention_case(op: str, name: str, grids, args) -> Case:
    dev, dt = args.device, args.dtype_t
    h, d = (2, 16) if args.smoke else (H, D)
    pk_ = Packed(op, grids, d)
    tq, tk = pk_.cu_q[-1], pk_.cu_k[-1]
    allowed = sum(int(m.materialize().sum()) for m in pk_.masks)
    e = dt.itemsize
    fwd_bytes = e * h * d * (2 * tq + 2 * tk)
    bwd_bytes = e * h * d * (4 * tq + 4 * tk) + 4 * h * tq
    fwd_flops = 4 * d * allowed * h
    bwd_flops = int(2.5 * fwd_flops)

    def make_inputs():
        return [torch.randn(n, h, d, device=dev, dtype=torch.float32).to(dt).requires_grad_()
                for n in (tq, tk, tk)]

    def reference(inputs, grad_out, ref_dtype, need_grad):
        """Every image alone: the float64 dense-mask oracle on its unpadded slices."""
        xs = [x.detach().to(ref_dtype).requires_grad_(need_grad) for x in inputs]
        outs = []
        with torch.set_grad_enabled(need_grad):
            for i, m in enumerate(pk_.masks):
                sl = [x[c[i]:c[i + 1]].transpose(0, 1)[None] for x, c in
                      zip(xs, (pk_.cu_q, pk_.cu_k, pk_.cu_k))]
                o = masked_attention(*sl, m.materialize(dev), pk_.scale)
                outs.append(o[0].transpose(0, 1))
            out = torch.cat(outs)
            if not need_grad:
                return out.detach(), [None] * 3
            out.backward(grad_out.to(ref_dtype))
        return out.detach(), [x.grad for x in xs]

    nq_max, nv_max = max(pk_.nq), max(pk_.nv)
    config = dict(n_seq=pk_.n_seq, n_images=len(grids), H=h, D=d, Dv=d, dtype=args.dtype,
                  total_q=tq, total_k=tk, nq_max=nq_max, nv_max=nv_max, nnz=allowed,
                  padded_pairs=pk_.n_seq * nq_max * nv_max, packed_pairs=tq * tk,
                  grids=[list(g) for g in grids])
    if op == "band":
        config["window"] = list(BAND_WINDOW)
    return Case(op=f"{op}_varlen", name=name, group=op, config=config, make_inputs=make_inputs,
                out_shape=(tq, h, d), reference=reference,
                bytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
                flops={"fwd": fwd_flops, "bwd": bwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
                ref_elems=0, extra=dict(packed=pk_))


def ours(backend: str, with_plan_build: bool) -> Provider:
    def setup(case):
        pk_ = case.extra["packed"]
        plan = None if with_plan_build else pk_.plan(case.extra["device"])

        def fn(q, k, v):
            with common.backend_refusals_as_not_available():
                return pk_.run_ours(q, k, v, backend, plan)
        return fn
    return Provider(f"ours[{backend}]" + ("+plan" if with_plan_build else ""), setup,
                    note=lambda case: "plan built in every call (from lists: no sync)"
                    if with_plan_build else "plan built before timing")


def sdpa_padded(with_mask_build: bool) -> Provider:
    def setup(case):
        pk_, dev = case.extra["packed"], case.extra["device"]
        nq_max, nv_max = max(pk_.nq), max(pk_.nv)

        def build():
            return pk_.padded_mask(pk_.windows(dev), dev)
        built = None if with_mask_build else build()

        def pad(x, idx, n):
            buf = x.new_zeros((pk_.n_seq, n) + tuple(x.shape[1:]))
            return buf.index_put(idx, x).transpose(1, 2)  # [n_seq, H, n, D]

        def fn(q, k, v):
            mask, qi, ki = built if built is not None else build()
            out = F.scaled_dot_product_attention(pad(q, qi, nq_max), pad(k, ki, nv_max),
                                                 pad(v, ki, nv_max), attn_mask=mask,
                                                 scale=pk_.scale)
            return out.transpose(1, 2)[qi]
        return fn

    def note(case):
        c = case.config
        gb = c["n_seq"] * c["nq_max"] * c["nv_max"] / 1e9
        return (f"bool mask [{c['n_seq']},1,{c['nq_max']},{c['nv_max']}] ({gb:.2f} GB) "
                + ("built in every call" if with_mask_build else "built before timing")
                + f"; unpinned dispatch picks {_sdpa_choice(case)}")
    return Provider("sdpa-padded" + ("+mask" if with_mask_build else ""), setup, note=note)


def _sdpa_choice(case) -> str:
    try:
        from torch.nn.attention import SDPBackend
        c, dev = case.config, case.extra["device"]
        dt = common.DTYPES[c["dtype"]]
        q = torch.empty(1, c["H"], c["nq_max"], c["D"], device=dev, dtype=dt)
        k = torch.empty(1, c["H"], c["nv_max"], c["D"], device=dev, dtype=dt)
        m = torch.ones(1, 1, c["nq_max"], c["nv_max"], dtype=torch.bool, device=dev)
        idx = torch._fused_sdp_choice(q, k, k, m, 0.0, False, scale=c["D"] ** -0.5)
        names = {int(getattr(b, "value", b)): n for n, b in SDPBackend.__members__.items()}
        return names.get(int(idx), str(idx)).lower()
    except Exception as exc:  # private API: best effort
        return f"unknown ({type(exc).__name__})"


def flex(args, with_mask_build: bool) -> Provider:
    """FlexAttention over the packed tokens as one sequence ``[1, H, total, D]``."""
    compiled = not args.smoke

    def setup(case):
        create_block_mask, attn = flex_functions(compiled)
        pk_, dev = case.extra["packed"], case.extra["device"]
        tq, tk = pk_.cu_q[-1], pk_.cu_k[-1]

        def build():
            w = pk_.windows(dev)
            sq, sk, lo, hi, x0, x1, kc = (w[n] for n in ("seq_q", "seq_k", "lo_g", "hi_g", "x0",
                                                         "x1", "kcol"))

            def mask_mod(b, h, q_idx, kv_idx):
                return ((sq[q_idx] == sk[kv_idx]) & (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])
                        & (kc[kv_idx] >= x0[q_idx]) & (kc[kv_idx] < x1[q_idx]))
            kw = dict(device=str(dev))
            if compiled:
                kw["_compile"] = True  # fused mask evaluation: no dense [total_q, total_k] bools
            try:
                return create_block_mask(mask_mod, None, None, tq, tk, **kw)
            except (NotImplementedError, RuntimeError) as exc:
                if dev.type == "cpu":
                    raise NotAvailable(f"create_block_mask on CPU: {common._short(exc)}") from exc
                raise
        built = None if with_mask_build else build()

        def fn(q, k, v):
            bm = built if built is not None else build()
            out = attn(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=bm,
                       scale=pk_.scale)
            return out[0].transpose(0, 1)
        return fn

    def note(case):
        kind = "compiled, create_block_mask(_compile=True)" if compiled else \
            "eager (unfused, smoke)"
        return (f"{kind}; BLOCK_SIZE=128; document mask_mod (sequence ids + windows); BlockMask "
                + ("built in every call" if with_mask_build else "built before timing"))

    def no_backward(case, a):
        return "FlexAttention has no CPU backward" if a.device == "cpu" else None
    return Provider("flex" + ("+mask" if with_mask_build else ""), setup, note=note,
                    no_backward=no_backward,
                    min_left_s=0.0 if args.smoke else attention_common.FLEX_COMPILE_S)


def wrong_provider() -> Provider:
    def setup(case):
        pk_ = case.extra["packed"]
        plan = pk_.plan(case.extra["device"])
        return lambda q, k, v: pk_.run_ours(q, k.roll(1, 0), v.roll(1, 0), "reference", plan)
    return Provider("wrong[rolled-keys]", setup,
                    note=lambda case: "deliberately wrong: keys rolled by one token")


def attention_providers(args) -> list:
    provs = [ours("reference", False)] if args.smoke else []
    provs += [ours("triton", False), ours("triton", True), sdpa_padded(False), sdpa_padded(True),
              flex(args, False), flex(args, True)]
    if args.inject_wrong:
        provs.append(wrong_provider())
    return provs


# --------------------------------------------------------------------------------------------
# pooling (DeCo)
# --------------------------------------------------------------------------------------------
def pool_case(name: str, grids, args) -> Case:
    dev, dt = args.device, args.dtype_t
    c = 8 if args.smoke else POOL_C
    outs = [pooled_grid(g) for g in grids]
    cu_in, cu_out = offsets(a * b for a, b in grids), offsets(a * b for a, b in outs)
    e = dt.itemsize
    io = e * c * (cu_in[-1] + cu_out[-1])

    def make_inputs():
        return [torch.randn(cu_in[-1], c, device=dev, dtype=torch.float32).to(dt)
                .requires_grad_()]

    def reference(inputs, grad_out, ref_dtype, need_grad):
        x = inputs[0].detach().to(ref_dtype).requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            out = torch.cat([F.adaptive_avg_pool2d(
                x[cu_in[i]:cu_in[i + 1]].T.reshape(1, c, *g), o).reshape(c, -1).T
                for i, (g, o) in enumerate(zip(grids, outs))])
            if not need_grad:
                return out.detach(), [None]
            out.backward(grad_out.to(ref_dtype))
        return out.detach(), [x.grad]

    config = dict(n_seq=len(grids), C=c, dtype=args.dtype, total_in=cu_in[-1],
                  total_out=cu_out[-1], grids=[list(g) for g in grids],
                  out_grids=[list(o) for o in outs])
    return Case(op="pool_varlen", name=name, group="pool", config=config,
                make_inputs=make_inputs, out_shape=(cu_out[-1], c), reference=reference,
                bytes={"fwd": io, "bwd": io, "fwd+bwd": 2 * io},
                flops={"fwd": c * cu_in[-1], "bwd": c * cu_in[-1],
                       "fwd+bwd": 2 * c * cu_in[-1]},
                ref_elems=0, extra=dict(cu_in=cu_in, grids=grids, outs=outs))


def pool_ours(backend: str, with_plan_build: bool) -> Provider:
    def setup(case):
        cu, grids, outs = (case.extra[n] for n in ("cu_in", "grids", "outs"))
        plan = None if with_plan_build else plan_pool(cu, grids, outs,
                                                      device=case.extra["device"])

        def fn(x):
            with common.backend_refusals_as_not_available():
                if plan is not None:
                    return pk.adaptive_avg_pool_tokens_varlen(x, plan=plan, backend=backend)[0]
                return pk.adaptive_avg_pool_tokens_varlen(x, cu, grids, outs, backend=backend)[0]
        return fn
    return Provider(f"ours[{backend}]" + ("+plan" if with_plan_build else ""), setup)


def pool_loop() -> Provider:
    def setup(case):
        cu, grids, outs = (case.extra[n] for n in ("cu_in", "grids", "outs"))

        def fn(x):
            c = x.shape[1]
            return torch.cat([F.adaptive_avg_pool2d(x[cu[i]:cu[i + 1]].T.reshape(1, c, *g), o)
                              .reshape(c, -1).T for i, (g, o) in enumerate(zip(grids, outs))])
        return fn
    return Provider("per-image-loop", setup,
                    note=lambda case: "F.adaptive_avg_pool2d image by image, torch.cat")


def pool_wrong() -> Provider:
    base = pool_loop()

    def setup(case):
        fn = base.setup(case)
        return lambda x: fn(x.roll(1, 0))
    return Provider("wrong[rolled-tokens]", setup,
                    note=lambda case: "deliberately wrong: tokens rolled by one")


def pool_providers(args) -> list:
    provs = [pool_ours("reference", False)] if args.smoke else []
    provs += [pool_ours("triton", False), pool_ours("triton", True), pool_loop()]
    return provs + ([pool_wrong()] if args.inject_wrong else [])


# --------------------------------------------------------------------------------------------
# ratios (reported, not asserted)
# --------------------------------------------------------------------------------------------
RATIO_PAIRS = (("flex / ours (kernels)", "flex", "ours[triton]"),
               ("flex+mask / ours+plan (incl. construction)", "flex+mask", "ours[triton]+plan"),
               ("sdpa-padded / ours (kernels)", "sdpa-padded", "ours[triton]"),
               ("sdpa-padded+mask / ours+plan (incl. construction)", "sdpa-padded+mask",
                "ours[triton]+plan"),
               ("pool loop / ours+plan", "per-image-loop", "ours[triton]+plan"))


def ratios(rows: list[dict]) -> dict:
    """Time ratios per case and mode, and memory growth from ``*-half`` to the full batch."""
    ok = {(r["case"], r["provider"], r["mode"]): r for r in rows if r["status"] == "ok"}
    times = []
    for (case, prov, mode), r in sorted(ok.items()):
        for label, num, den in RATIO_PAIRS:
            if prov == num and (case, den, mode) in ok:
                times.append(dict(case=case, mode=mode, ratio=label,
                                  value=round(r["ms"] / ok[(case, den, mode)]["ms"], 3)))
    growth = []
    configs = {r["case"]: r["config"] for r in rows}
    for case in configs:
        half = case + "-half"
        if half not in configs or "packed_pairs" not in configs[case]:
            continue
        pairs = configs[case]["packed_pairs"] / configs[half]["packed_pairs"]
        for (c, prov, mode), r in sorted(ok.items()):
            other = ok.get((half, prov, mode))
            if c == case and other and r.get("extra_mb") and other.get("extra_mb"):
                growth.append(dict(case=case, provider=prov, mode=mode,
                                   extra_mb_half=other["extra_mb"], extra_mb=r["extra_mb"],
                                   growth=round(r["extra_mb"] / other["extra_mb"], 2),
                                   total_q_x_total_k_growth=round(pairs, 2)))
    return dict(time=times, memory_growth=growth,
                note="reported, not asserted; goal (issue 14): flex+mask / ours+plan >= 3 and "
                     "no memory growing with total_q x total_k")


def print_ratios(res: dict) -> None:
    print("\n[varlen] ratios (reported, not asserted; > 1: ours faster)")
    for r in res["time"]:
        print(f"  {r['case']:14s} {r['mode']:8s} {r['ratio']:52s} {r['value']:8.3f}")
    for r in res["memory_growth"]:
        print(f"  {r['case']:14s} {r['mode']:8s} {r['provider']:20s} extra MB "
              f"{r['extra_mb_half']} -> {r['extra_mb']} ({r['growth']}x; total_q x total_k "
              f"{r['total_q_x_total_k_growth']}x)")


# --------------------------------------------------------------------------------------------
def cases(args) -> list:
    """Most important first (the time budget cuts the tail)."""
    full, half = batch_grids(args.smoke, False), batch_grids(args.smoke, True)
    out = [("pg", "partial_global", full), ("pg-half", "partial_global", half),
           ("band", "band", full), ("band-half", "band", half)]
    if args.quick:
        out = out[:2]
    res = []
    for name, op, grids in out:
        res.append((lambda n=name, o=op, g=grids: attention_case(o, n, g, args), op))
    for name, grids in (("pool", full), ("pool-half", half))[: 1 if args.quick else 2]:
        res.append((lambda n=name, g=grids: pool_case(n, g, args), "pool"))
    return res


def plan(args) -> list:
    """``(make_case, providers)`` per case, in ``cases`` order."""
    dev = torch.device(args.device)
    provs = {"pool": common.selected(pool_providers(args), args)}
    provs["partial_global"] = provs["band"] = common.selected(attention_providers(args), args)

    def make(thunk):
        case = thunk()
        case.extra["device"] = dev
        return case
    return [(lambda t=thunk: make(t), provs[kind]) for thunk, kind in cases(args)]


def main(argv=None) -> int:
    args, rec = common.start("varlen", __doc__.splitlines()[0], argv)
    common.run_cases(plan(args), rec, args)
    # the ratios over every row of this script in the folder (run_all runs it in phases, one
    # raw file each: raw/varlen.<phase>.jsonl)
    import glob
    import json
    rows = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(rec.path), "varlen*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    rec.meta["ratios"] = ratios(rows)
    rec.write_meta()
    print_ratios(rec.meta["ratios"])
    return 0

if __name__ == "__main__":
    sys.exit(main())
