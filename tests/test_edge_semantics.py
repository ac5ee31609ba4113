"""Edge semantics equal to ``F.scaled_dot_product_attention`` (the README's "Guarantees"), on the
Triton (interpreter on CPU) and reference backends:

* a row whose scores are all -inf (reachable only with -inf in the inputs) gives output 0 and
  zero gradients, as SDPA (torch >= 2.5 uses a "safe" softmax);
* NaN / Inf in what a row attends to (its query, the keys and values in its window) propagate to
  that row as in SDPA: same NaN / +-inf pattern, same finite values; no crash, forward or
  backward.

The oracle is SDPA itself (its math backend, the definition), in float64, row by row over the keys each row's mask allows.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask
from pargo_kernels.testing import REL_TOL, rel_error
from test_attention import lower_split_threshold

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "reference"]
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}

CASES = {
    # id: (mask, call(q, k, v, backend))
    "pg1d": (PartialGlobalMask(9, 21, 6),
             lambda q, k, v, be: pk.partial_global_attention(q, k, v, 6, backend=be)),
    "pg2d": (PartialGlobalMask(8, 20, 6, (4, 5), (2, 3)),
             lambda q, k, v, be: pk.partial_global_attention(
                 q, k, v, 6, visual_grid=(4, 5), partial_grid=(2, 3), backend=be)),
    "band": (BandMask(13, 2, 1),
             lambda q, k, v, be: pk.band_attention(q, k, v, (2, 1), backend=be)),
    "cross-np0": (PartialGlobalMask(7, 19, 0),
                  lambda q, k, v, be: pk.partial_global_attention(q, k, v, 0, backend=be)),
    "pgself": (ParGoSelfMask(13, 8, 2, 1),
               lambda q, k, v, be: pk.pargo_self_attention(q, k, v, 8, (2, 1), backend=be)),
}

# Shapes whose global tiles split over their keys once the split threshold is lowered
# (test_attention.lower_split_threshold): the all--inf rows then go through the LSE merge.
SPLIT_CASES = {
    "pg1d-split": (PartialGlobalMask(150, 140, 140),
                   lambda q, k, v, be: pk.partial_global_attention(q, k, v, 140, backend=be)),
    "pgself-split": (ParGoSelfMask(200, 9, 2, 1),
                     lambda q, k, v, be: pk.pargo_self_attention(q, k, v, 9, (2, 1), backend=be)),
}


def _sdpa(q, k, v, mask):
    """Row ``i`` = SDPA of query ``i`` over the keys its mask allows, and only those. (SDPA given
    the dense mask instead adds -inf to a masked score, so a masked NaN or +inf score would turn
    the row into NaN: the kernels never compute masked scores, and neither does this oracle.)"""
    dense = mask.materialize(q.device)
    with sdpa_kernel(SDPBackend.MATH):  # CPU's flash kernel turns a NaN row into 0, not NaN
        rows = [F.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, dense[i]], v[:, :, dense[i]],
                                               scale=q.shape[-1] ** -0.5)
                for i in range(mask.n_query)]
    return torch.cat(rows, dim=2)


def _grads(fn, inputs, grad, dtype=None):
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def assert_same_values(name, actual, expected, dtype):
    """Same NaN, +inf and -inf positions; the finite elements within the dtype's tolerance."""
    a, e = actual.detach().double(), expected.detach().double()
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = (test(a) != test(e)).nonzero()
        assert diff.numel() == 0, f"{name}: {what} pattern differs from SDPA at {diff[:4].tolist()}"
    finite = torch.isfinite(e)
    if finite.any():
        err = rel_error(a[finite], e[finite])
        assert err <= REL_TOL[dtype], f"{name}: finite part off by {err:.2e} ({dtype})"


def _inputs(mask, dtype, device, D=16):
    q = torch.randn(2, 2, mask.n_query, D, device=device).to(dtype)
    k = torch.randn(2, 2, mask.n_key, D, device=device).to(dtype)
    v = torch.randn(2, 2, mask.n_key, D, device=device).to(dtype)
    return q, k, v


# --------------------------------------------------------------------------------------------
# rows whose scores are all -inf
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_row_with_all_scores_minus_inf_is_zero_as_sdpa(case, backend, dtype, device):
    _check_minus_inf_rows(CASES[case], backend, dtype, device)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_row_with_all_scores_minus_inf_key_split_is_zero_as_sdpa(case, dtype, device,
                                                                 monkeypatch):
    """The same through the key splits of global tiles: every split of such a row has LSE -inf,
    and the merge must give output 0 and LSE -inf (not exp2(-inf - -inf) = NaN)."""
    launches = lower_split_threshold(monkeypatch)
    _check_minus_inf_rows(SPLIT_CASES[case], "triton", dtype, device)
    assert "fwd_merge" in launches and "dq_reduce" in launches  # the shapes did split


def _check_minus_inf_rows(case, backend, dtype, device, D=16):
    """q[row, 0] = -inf and k[:, 0] > 0: every score of that row is -inf. SDPA returns 0 for the
    row, dq = 0 for it and dv unaffected by it; dk's column 0 is NaN (0 * -inf in dS^T Q) for
    the keys the row's tiles reach (SDPA: every key; compared exactly where the row sees every
    key, elsewhere outside that column)."""
    mask, call = case
    q, k, v = _inputs(mask, dtype, device, D)
    k[..., 0] = k[..., 0].abs() + 0.5
    rows = [1, mask.n_query - 1]  # a first-segment row and the last row (global for pg)
    for r in rows:
        q[:, :, r, 0] = float("-inf")
    grad = torch.randn(2, 2, mask.n_query, v.shape[-1], device=device).to(dtype)
    got = _grads(lambda a, b, c: call(a, b, c, backend), (q, k, v), grad)
    ref = _grads(lambda a, b, c: _sdpa(a, b, c, mask), (q, k, v), grad, torch.float64)
    assert torch.equal(got[0][:, :, rows], torch.zeros_like(got[0][:, :, rows]))
    for name, g, r in zip(("out", "dq", "dv"), (got[0], got[1], got[3]), (ref[0], ref[1], ref[3])):
        assert_same_values(name, g, r, dtype)
    sees_all = mask.materialize()[rows].all()
    dk, ref_dk = (got[2], ref[2]) if sees_all else (got[2][..., 1:], ref[2][..., 1:])
    assert_same_values("dk", dk, ref_dk, dtype)


@pytest.mark.triton
def test_saved_lse_of_an_all_minus_inf_row_is_its_logsumexp(device):
    """The forward saves LSE = -inf for such a row (its logsumexp); the backward maps it to +inf
    so that its P = 2^(S - LSE) is 0 (checked by the gradient test above)."""
    mask = CASES["pg1d"][0]
    q, k, v = _inputs(mask, torch.float32, device)
    k[..., 0] = k[..., 0].abs() + 0.5
    q[:, :, 2, 0] = float("-inf")
    _, lse = torch.ops.pargo.masked_attention_fwd(q, k, v, mask.kind, list(mask.params), 0.25,
                                                  "triton")
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, 3:]).all()


# --------------------------------------------------------------------------------------------
# NaN / Inf propagation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "kv"])
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("case", ["pg1d", "pg2d", "band"])
def test_nonfinite_inputs_propagate_as_sdpa(case, value, where, backend, device):
    _check_nonfinite(case, value, where, backend, torch.float32, device)


def _check_nonfinite(case, value, where, backend, dtype, device, D=16):
    """A non-finite element in one query row, or in one key and its value: every row that
    attends to it (the rows of q: each depends on its own query only) matches SDPA exactly in
    its NaN / inf pattern and closely in its finite values. Rows whose mask excludes the poisoned
    key are not compared: a masked NaN / inf value may reach them (0 * NaN in P @ V over a tile
    the row visits; SDPA with a dense mask lets masked NaN keys and values in as well). The
    backward runs and has the inputs' shapes."""
    mask, call = CASES[case]
    q, k, v = _inputs(mask, dtype, device, D)
    dense = mask.materialize(device)
    pick = lambda n: int(torch.randint(n, ()))  # noqa: E731
    if where == "q":
        q[1, 0, pick(mask.n_query), pick(q.shape[3])] = NONFINITE[value]
    else:
        n = pick(mask.n_key)
        k[1, 0, n, pick(k.shape[3])] = NONFINITE[value]
        v[1, 0, n, pick(v.shape[3])] = NONFINITE[value]
    grad = torch.randn(2, 2, mask.n_query, v.shape[-1], device=device).to(dtype)
    got = _grads(lambda a, b, c: call(a, b, c, backend), (q, k, v), grad)
    ref = _grads(lambda a, b, c: _sdpa(a, b, c, mask), (q, k, v), grad, torch.float64)
    rows = slice(None) if where == "q" else dense[:, n]
    assert_same_values("out", got[0][:, :, rows], ref[0][:, :, rows], dtype)
    if where == "q":  # dq of a row depends on its own query only among the queries
        assert_same_values("dq", got[1], ref[1], dtype)
    for g, x in zip(got[1:], (q, k, v)):
        assert g.shape == x.shape


# --------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/attention_*.cu: fp16/bf16, head dims 64 and 128), GPU only
# --------------------------------------------------------------------------------------------
def _cuda_skip_reason() -> str:
    from test_attention_cuda import _WHY
    return _WHY


@pytest.mark.skipif(bool(_cuda_skip_reason()), reason=_cuda_skip_reason() or "runs")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernels_edge_semantics(case):
    for dtype in (torch.float16, torch.bfloat16):
        _check_minus_inf_rows(CASES[case], "cuda", dtype, "cuda", D=64)
        for value in NONFINITE:
            for where in ("q", "kv"):
                _check_nonfinite(case, value, where, "cuda", dtype, "cuda", D=64)


# --------------------------------------------------------------------------------------------
# autocast, torch.func / double backward, determinism
# --------------------------------------------------------------------------------------------
POOL = dict(in_grid=(5, 7), out_grid=(3, 2))


def _pool_inputs(device, dtype=torch.float32):
    return (torch.randn(2, 35, 24, device=device).to(dtype),
            (torch.randn(16, 24, device=device) * 0.2).to(dtype),
            torch.randn(16, device=device).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["pg1d", "band"])
def test_autocast_casts_like_sdpa(case, amp, backend, device):
    """Under torch.autocast(device, amp): mixed-dtype q, k, v accepted, cast to ``amp``, the
    output in ``amp`` as SDPA's, equal to the op on inputs cast by hand; gradients flow back to
    the inputs in their own dtypes. The registered (Triton) op follows the same rule."""
    mask, call = CASES[case]
    q, k, v = _inputs(mask, torch.float32, device)
    k = k.to(torch.float16 if amp == torch.bfloat16 else torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with torch.autocast(device, dtype=amp):
        out = call(*leaves, backend)
        sdpa = F.scaled_dot_product_attention(q, k.float(), v, attn_mask=mask.materialize(device))
        if backend == "triton":
            op_out, _ = torch.ops.pargo.masked_attention_fwd(q, k, v, mask.kind,
                                                             list(mask.params), 0.25, "triton")
            assert op_out.dtype == amp
    assert out.dtype == sdpa.dtype == amp
    by_hand = [t.detach().to(amp).requires_grad_(True) for t in (q, k, v)]
    expected = call(*by_hand, backend)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for leaf, ref in zip(leaves, by_hand):
        assert leaf.grad.dtype == leaf.dtype
        assert torch.equal(leaf.grad, ref.grad.to(leaf.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_pooling_like_torch(backend, device):
    """adaptive_avg_pool_project casts as F.linear does (autocast dtype); the pooling alone
    runs in the input dtype, as F.adaptive_avg_pool2d does."""
    x, w, b = _pool_inputs(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        proj = pk.adaptive_avg_pool_project(x, w, b.half(), **POOL, backend=backend)
        pooled = pk.adaptive_avg_pool_tokens(x, **POOL, backend=backend)
        linear = F.linear(x, w, b)
        avg = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 24, 5, 7), (3, 2))
    assert proj.dtype == linear.dtype == torch.bfloat16
    assert pooled.dtype == avg.dtype == torch.float32
    expected = pk.adaptive_avg_pool_project(x.bfloat16(), w.bfloat16(), b.half().bfloat16(), **POOL,
                                            backend=backend)
    assert torch.equal(proj, expected)


def assert_transforms_refused(calls: dict) -> None:
    """Each ``{name: (fn, input)}`` on the Triton backend refuses torch.func transforms and double
    backward with a NotImplementedError saying so (shared with tests/test_varlen.py)."""
    for name, (fn, inp) in calls.items():
        with pytest.raises(NotImplementedError, match=r"torch\.func transforms .*'triton'"):
            torch.func.jacrev(fn)(inp)
        leaf = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf).square().sum(), leaf, create_graph=True)
        with pytest.raises(NotImplementedError, match="double backward"):
            g.sum().backward()


@pytest.mark.triton
def test_torch_func_and_double_backward_are_refused_clearly(device):
    """jacrev / vmap-based transforms and double backward raise NotImplementedError naming what
    is unsupported on the kernel backend; the reference backend supports both, and plain-autograd
    Jacobians (torch.autograd.functional.jacobian) work on the kernels and agree with it."""
    mask, call = CASES["pg1d"]
    q, k, v = _inputs(mask, torch.float32, device)
    q, k, v = q[:1, :1], k[:1, :1], v[:1, :1]
    x, w, b = _pool_inputs(device)
    kernel_fns = {
        "attention": (lambda t: call(t, k, v, "triton"), q),
        "pool": (lambda t: pk.adaptive_avg_pool_tokens(t, **POOL, backend="triton"), x),
        "pool_project": (lambda t: pk.adaptive_avg_pool_project(t, w, b, **POOL,
                                                                backend="triton"), x),
    }
    assert_transforms_refused(kernel_fns)
    jac = torch.autograd.functional.jacobian(kernel_fns["attention"][0], q)
    ref = torch.func.jacrev(lambda t: call(t, k, v, "reference"))(q)
    assert_same_values("jacobian", jac, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_are_bitwise_deterministic(backend, dtype, device):
    """No atomics, fixed reduction orders: two runs give bitwise-equal outputs and gradients."""
    x, w, b = _pool_inputs(device, dtype)
    calls = [(lambda a, bb, c, call=call: call(a, bb, c, backend), _inputs(mask, dtype, device))
             for mask, call in CASES.values()]
    calls.append((lambda a, bb, c: pk.adaptive_avg_pool_project(a, bb, c, **POOL,
                                                                 backend=backend), (x, w, b)))
    calls.append((lambda a: pk.adaptive_avg_pool_tokens(a, **POOL, backend=backend), (x,)))
    for fn, inputs in calls:
        grad = None
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out = fn(*leaves)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
            runs.append([out] + [t.grad for t in leaves])
        for a, c in zip(*runs):
            assert torch.equal(a, c)
