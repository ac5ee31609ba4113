"""pytest-benchmark entry to the op microbenchmarks: a second entry to the cases of
``run_all.py``, not a copy of them.

    pytest benchmarks/ --benchmark-only            # on a GPU, from the repository root

Cases and providers come from the benchmark scripts themselves: the paper shape of
``bench_partial_global.py`` (B=256, H=8, D=64, Np=288 + Ng=16, Nv=576, bf16) with the providers
of ``attention_common.py`` (ours, dense masked SDPA pinned to each backend, FlexAttention, the
eager ParGo path), and the deco case of ``bench_pooling.py`` (B=256, 24x24 -> 12x12,
C=1024 -> 4096) with its providers (ours by default = pool kernel + ``F.linear``, ours fused,
DeCo's pool + matmul eager and compiled). Modes ``fwd`` and ``fwd+bwd``.

Each provider first passes the correctness gate of ``run_all.py`` (``common.check_provider``
against the float64 / fp32 reference, ``REL_TOL``); a wrong provider fails its test. A timed
round takes the next rotated input set (``common.prepare_case``), clears the gradients and
synchronises CUDA outside the timer; the call synchronises CUDA before it returns. A provider
that cannot serve the case (not installed, refused) is skipped with its reason. Without a GPU
every test is skipped with the reason (``-ra`` prints it). ``make test`` does not collect this
file (pytest.ini: ``testpaths = tests``). ``PARGO_BENCH_SMOKE=1`` runs the plumbing on a CPU
with the scripts' ``--smoke`` shapes (host clock: no timing claims).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_partial_global  # noqa: E402
import bench_pooling  # noqa: E402
import common  # noqa: E402
from attention_common import attention_providers  # noqa: E402

SMOKE = os.environ.get("PARGO_BENCH_SMOKE", "") == "1"
NO_GPU = None if torch.cuda.is_available() or SMOKE else (
    "no CUDA device (torch.cuda.is_available() is False): the op microbenchmarks time GPU "
    "kernels; run `pytest benchmarks/ --benchmark-only` on a GPU machine")
pytestmark = pytest.mark.skipif(NO_GPU is not None, reason=NO_GPU or "")
MODES = ("fwd", "fwd+bwd")
ROUNDS, WARMUP_ROUNDS = 20, 3


def _args():
    """The scripts' own arguments with their defaults (bf16, full shapes; ``--smoke`` if SMOKE)."""
    return common.parser("pytest-benchmark entry").parse_args(["--smoke"] if SMOKE else [])


def _cases(args, pk):
    """``{case name: (case builder, providers)}``: the first full-run shape of each script."""
    paper = bench_partial_global.shapes(args)[0]
    deco = bench_pooling.shapes(args)[0]
    return {
        paper[0]: (lambda: bench_partial_global.make_case(paper, args),
                   attention_providers(args, bench_partial_global.op)),
        deco[0]: (lambda: bench_pooling.pooling_case(*deco, args),
                  bench_pooling.providers(args, pk)),
    }


def _collect():
    args = _args()
    return [(name, prov.name) for name, (_, provs) in _cases(args, None).items()
            for prov in provs]


_STATE: dict = {}


def _prepared(case_name):
    """Built once per case on the GPU: args, case, providers, inputs and reference."""
    if case_name not in _STATE:
        _STATE.clear()  # one case's inputs at a time
        args = _args()
        common.finish_args(args)
        common.free_memory(args.device, full=True)
        pk, why = bench_pooling.import_ours()
        build, provs = _cases(args, pk)[case_name]
        case = build()
        sets, grad_out, _, ref_out, ref_grads = common.prepare_case(case, args, True)
        _STATE[case_name] = dict(args=args, case=case, provs={p.name: p for p in provs},
                                 sets=sets, grad_out=grad_out, ref=(ref_out, ref_grads),
                                 checked={})
    return _STATE[case_name]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name, provider", _collect())
def test_op(benchmark, case_name, provider, mode):
    st = _prepared(case_name)
    args, case, prov = st["args"], st["case"], st["provs"][provider]
    try:
        fn = prov.setup(case)
    except common.NotAvailable as exc:
        pytest.skip(f"{provider}: {exc}")
    no_bwd = prov.no_backward(case, args)
    if mode != "fwd" and no_bwd:
        pytest.skip(f"{provider}: {no_bwd}")
    if provider not in st["checked"]:
        try:
            st["checked"][provider] = common.check_provider(
                fn, case, st["sets"][0], st["grad_out"], *st["ref"], True, no_bwd)
        except common.NotAvailable as exc:
            pytest.skip(f"{provider}: {exc}")
    tol = common.REL_TOL[args.dtype_t]
    errs = [e for e in st["checked"][provider] if e is not None]
    assert max(errs) <= tol, f"{provider} is WRONG on {case_name}: error {max(errs):.2e} > {tol}"

    backward = mode == "fwd+bwd"
    # as run_all.py: the forward is timed with autograd on (the training forward)
    leaves = [[t.detach().requires_grad_(t.requires_grad and not no_bwd) for t in s]
              for s in st["sets"]]
    turn = {"i": 0}

    def next_set():
        inputs = leaves[turn["i"] % len(leaves)]
        turn["i"] += 1
        for t in inputs:
            t.grad = None
        common.sync(args.device)
        return tuple(inputs), {}

    def call(*inputs):
        out = fn(*inputs)
        if backward:
            out.backward(st["grad_out"])
        common.sync(args.device)

    benchmark.group = f"{case_name} {mode}"
    benchmark.extra_info.update(provider=provider, note=prov.note(case), err=max(errs),
                                useful_bytes=case.bytes[mode], useful_flops=case.flops[mode])
    benchmark.pedantic(call, setup=next_set, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
