"""Mutation testing: plant plausible bugs one at a time and check that the tests catch them.

Each mutant is a text edit of one source file (an exact ``pattern`` that must occur exactly once,
and its ``replacement``), applied to a temporary copy of the repository; then the tests that
should kill it run there (``pytest -x``). A mutant is *killed* when they fail, *survived*
when they pass. A pattern that no longer matches the source fails loudly (exit status 2): the
mutant must then be updated to the changed kernel, not silently skipped.

Not part of ``make test`` (it runs pytest ~20 times). Run from the repository root::

    PYTHONPATH=$PWD python tests/mutations.py              # all mutants, a table at the end
    PYTHONPATH=$PWD python tests/mutations.py --list       # ids and descriptions
    PYTHONPATH=$PWD python tests/mutations.py fwd-1d-window-ceil scale-nan-accepted

Exit status: 0 if every mutant expected to be killed was killed, 1 otherwise, 2 on a stale
pattern. ``expect="survive"`` marks a known hole (what no CPU test can see), listed so that it
stays visible.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATT = "pargo_kernels/ops/attention_triton.py"
POOL = "pargo_kernels/ops/pool_triton.py"
PLAN = "pargo_kernels/ops/attention_plan.py"  # launch plans (engineer attn's restructuring)
MLLM = "models/mllm/model.py"


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    pattern: str
    replacement: str
    tests: tuple  # pytest arguments: files and -k selections
    what: str
    expect: str = "kill"
    # other spellings of the same bug, ``(path, pattern, replacement)``, tried in order when
    # ``pattern`` is not in ``path`` (e.g. the code as restructured on another branch)
    alternatives: tuple = ()

    def edits(self):
        return ((self.path, self.pattern, self.replacement),) + self.alternatives


MUTANTS = [
    # --- attention kernels: windows and tile ranges
    Mutant("fwd-1d-window-ceil", ATT,
           "hi = tl.where(is_global, zero + Nv, ((rows + 1) * Nv) // n_p)",
           "hi = tl.where(is_global, zero + Nv, ((rows + 1) * Nv + n_p - 1) // n_p)",
           ("tests/test_attention.py", "-k", "np-not-dividing-nv and triton"),
           "1-D partial window end rounded up (overlapping windows when Np does not divide Nv)"),
    Mutant("fwd-2d-window-floor", ATT,
           "y1 = ((r + 1) * P1 + P3 - 1) // P3",
           "y1 = ((r + 1) * P1) // P3",
           ("tests/test_attention.py", "-k", "2d-uneven-5x7-3x2 and triton"),
           "2-D window's last row rounded down (adaptive windows lose their overlap)"),
    Mutant("band-right-exclusive", ATT,
           "hi = tl.minimum(rows + P1 + 1, Nv)",
           "hi = tl.minimum(rows + P1, Nv)",
           ("tests/test_attention.py", "-k", "asymmetric-3-7 and triton"),
           "band window's right end off by one"),
    Mutant("dkdv-skip-global-rows", ATT,
           "if KIND != 2:  # every global query sees every key",
           "if KIND == 3:  # every global query sees every key",
           ("tests/test_attention.py", "-k", "np-not-dividing-nv and triton"),
           "dK/dV ignore the global queries"),
    Mutant("dkdv-first-row-skipped", ATT,
           "q_lo = tl.maximum(((n0 + 1) * P0 + Nv - 1) // Nv - 1, 0)",
           "q_lo = tl.maximum(((n0 + 1) * P0 + Nv - 1) // Nv, 0)",
           ("tests/test_attention.py", "-k", "np-not-dividing-nv and triton"),
           "dK/dV inverse window misses the first partial row that sees a key tile",
           alternatives=((PLAN, 'q_lo = np.searchsorted(hi, n0, side="right")',
                          'q_lo = np.searchsorted(hi, n0, side="right") + 1'),)),
    # --- attention kernels: arithmetic
    Mutant("fwd-no-rescale", ATT,
           "acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)",
           "acc = acc + _dot(p.to(v.dtype), v, PRECISION)",
           ("tests/test_attention.py", "-k", "multi-tile-150 and triton"),
           "online softmax: accumulator not rescaled when the running max changes"),
    Mutant("dq-missing-scale", ATT,
           "(dq * sm_scale).to(DQ.dtype.element_ty)",
           "dq.to(DQ.dtype.element_ty)",
           ("tests/test_attention.py", "-k", "test_custom_scale"),
           "dQ not multiplied by the softmax scale",
           alternatives=((ATT, "dq = dq * sm_scale", "dq = dq"),
                         (ATT, "return dq * sm_scale", "return dq"))),
    Mutant("fp32-delta-no-do", ATT,
           "delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)",
           "delta = tl.sum(o.to(tl.float32), 1)",
           ("tests/test_attention.py", "-k", "np-not-dividing-nv and triton"),
           "fp32 delta = rowsum(O) instead of rowsum(O * dO)"),
    Mutant("delta-from-rounded-output", ATT,
           "delta_pass = q.dtype != torch.float32",
           "delta_pass = False",
           # with the interpreter rounding bf16 to nearest (tests/conftest.py) the single-op
           # sharp test no longer sees it; the 3-layer bf16 ParGo does (dq, dk 3-5x PyTorch's)
           ("tests/test_projectors.py", "-k", "kernels_match_reference and pargo-torch.bfloat16"),
           "16-bit delta from the rounded output instead of rowsum(P * dP)",
           alternatives=((PLAN, "delta_pass = p.dtype != torch.float32", "delta_pass = False"),)),
    Mutant("lse-natural-log", ATT,
           "tl.store(LSE + bh * Nq + rows, m_i + tl.log2(l_safe), mask=valid)",
           "tl.store(LSE + bh * Nq + rows, (m_i + tl.log2(l_safe)) * 0.6931471805599453, "
           "mask=valid)",
           ("tests/test_attention_accuracy.py", "-k", "lse and fp32"),
           "saved log-sum-exp in base e instead of base 2 (the backward then agrees with it)"),
    Mutant("empty-row-lse-not-mapped", "pargo_kernels/attention.py",
           'lse = lse.masked_fill(lse == float("-inf"), float("inf"))',
           "lse = lse",
           ("tests/test_edge_semantics.py", "-k", "minus_inf and triton and fp32"),
           "a row of -inf scores keeps LSE = -inf in the backward: NaN gradients (SDPA: 0)"),
    Mutant("fp32-uses-tf32", ATT,
           'return "ieee" if dtype == torch.float32 else "tf32"',
           'return "tf32"',
           ("tests/test_attention.py", "-k", "test_custom_scale"),
           "TF32 for fp32 inputs: the interpreter ignores precision; only the AOT PTX check "
           "(engineer attn) can see it", expect="survive"),
    # --- masks, reference, validation
    Mutant("ref-mask-1d-ceil", "pargo_kernels/masks.py",
           "lo, hi = i * nv // np_, (i + 1) * nv // np_",
           "lo, hi = i * nv // np_, -(-(i + 1) * nv // np_)",
           ("tests/test_masks_and_errors.py", "-k", "definition"),
           "reference 1-D mask: window end rounded up"),
    Mutant("band-mask-params-swapped", "pargo_kernels/masks.py",
           "return (min(self.left, self.n - 1), min(self.right, self.n - 1), 0, 0, 0)",
           "return (min(self.right, self.n - 1), min(self.left, self.n - 1), 0, 0, 0)",
           ("tests/test_attention.py", "-k", "asymmetric-3-7 and triton"),
           "band (left, right) swapped on the way to the kernels"),
    Mutant("ref-unsafe-softmax", "pargo_kernels/reference.py",
           "p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)",
           "p = torch.softmax(s, dim=-1)",
           ("tests/test_edge_semantics.py", "-k", "minus_inf and reference and fp32"),
           "reference softmax gives NaN for a row of -inf scores (SDPA: 0)"),
    Mutant("scale-nan-accepted", "pargo_kernels/_validate.py",
           'if scale != scale or scale in (float("inf"), float("-inf")):',
           "if False:",
           ("tests/test_attention_accuracy.py", "-k", "scale"),
           "NaN / infinite scale accepted"),
    Mutant("n-partial-above-nv-accepted", "pargo_kernels/masks.py",
           "if np_ > nv:",
           "if False:",
           ("tests/test_masks_and_errors.py", "-k", "above_nv"),
           "n_partial > Nv accepted (empty partial windows)"),
    Mutant("mixed-dtypes-accepted", "pargo_kernels/_validate.py",
           "if t.dtype != first.dtype:",
           "if False:",
           ("tests/test_masks_and_errors.py", "-k", "test_tensor_errors"),
           "q, k, v of different dtypes accepted"),
    # --- autocast and transforms
    Mutant("autocast-no-cast", "pargo_kernels/_transforms.py",
           "return value.to(dtype)",
           "return value",
           ("tests/test_edge_semantics.py", "-k", "autocast and pg1d and reference"),
           "autocast leaves the inputs in their dtypes"),
    Mutant("functorch-not-refused", "pargo_kernels/_transforms.py",
           "and torch._C._are_functorch_transforms_active():",
           "and False:",
           ("tests/test_edge_semantics.py", "-k", "torch_func"),
           "jacrev reaches the kernels and fails with torch's internal message"),
    # --- pooling kernels
    Mutant("pool-window-floor", POOL,
           "return (o * n_in) // n_out, ((o + 1) * n_in + n_out - 1) // n_out",
           "return (o * n_in) // n_out, ((o + 1) * n_in) // n_out",
           ("tests/test_pooling.py", "-k", "27-12-overlap and triton"),
           "pooling window end rounded down (overlapping windows lose a row/column)"),
    Mutant("pool-count-rows-only", POOL,
           "inv = 1.0 / ((y1 - y0) * (x1 - x0)).to(tl.float32)",
           "inv = 1.0 / (y1 - y0).to(tl.float32)",
           ("tests/test_pooling.py", "-k", "24-7 and triton"),
           "pooled mean divided by the window height only"),
    # --- packed (varlen) band attention with per-sequence windows
    Mutant("varlen-band-window-of-previous-sequence", "pargo_kernels/ops/varlen_triton.py",
           "p0 = tl.minimum(tl.maximum(LEFT, tl.load(row + A_P0)), nq - 1)",
           "p0 = tl.minimum(tl.maximum(LEFT, tl.load(META + tl.maximum(s - 1, 0) * A_FIELDS "
           "+ A_P0)), nq - 1)",
           ("tests/test_varlen.py", "-k", "per_sequence_windows and fp32"),
           "a sequence's per-sequence left window read from the previous sequence's plan row"),
    Mutant("varlen-band-dkdv-inverts-the-shared-window", "pargo_kernels/ops/varlen_triton.py",
           "nq, nv,\n                                   p0, p1, p2, p3, p4, KIND)",
           "nq, nv,\n                                   tl.minimum(LEFT, nq - 1), "
           "tl.minimum(RIGHT, nq - 1), p2, p3, p4, KIND)",
           ("tests/test_varlen.py", "-k", "per_sequence_windows and fp32"),
           "dK/dV key tiles invert the per-call window instead of their sequence's own"),
    Mutant("packed-self-plan-per-layer", "models/projectors/packed.py",
           "if key not in self._plans:", "if True:",
           ("tests/test_projectors_packed.py", "-k", "float64 and official"),
           "the packed projector rebuilds its band plan in every layer"),
    # --- MLLM trainer: several images of different sizes / video frames per sample
    Mutant("mllm-packed-images-reversed", MLLM,
           "y, counts = self.projector(torch.cat(feats).to(proj_dtype), visual_grids=grids)",
           "y, counts = self.projector(torch.cat(feats[::-1]).to(proj_dtype), "
           "visual_grids=grids)",
           ("tests/test_mllm_varres.py", "-k", "splice"),
           "packed images spliced in reverse order"),
    Mutant("mllm-same-size-group-scrambled", MLLM,
           "feats[i] = hs[k]", "feats[i] = hs[len(idx) - 1 - k]",
           ("tests/test_mllm_varres.py", "-k", "splice"),
           "images of equal size (batched through the tower together) put back in the wrong "
           "order"),
    Mutant("mllm-no-run-check", MLLM,
           "self._check_image_runs(is_image, counts)", "pass",
           ("tests/test_mllm_varres.py", "-k", "checked"),
           "placeholders whose lengths do not match their images' token counts are filled "
           "anyway (tokens shifted across images)"),
    Mutant("data-counts-off-by-one", "models/mllm/data.py",
           "counts = [self.tokens_for_grid(g) for g in grids]",
           "counts = [self.tokens_for_grid(g) + 1 for g in grids]",
           ("tests/test_mllm_varres.py", "-k", "dataset_items"),
           "each placeholder expanded to one token more than its image's count"),
    Mutant("native-size-always-floor", "models/mllm/data.py",
           "rw, rh = (max(patch, round(v / patch) * patch) for v in (w, h))",
           "rw, rh = (max(patch, math.floor(v / patch) * patch) for v in (w, h))",
           ("tests/test_mllm_varres.py", "-k", "native_size"),
           "native sizes always rounded down (shrinks images that fit)"),
    Mutant("video-frames-lexicographic", "models/mllm/data.py",
           "key=_natural_key)", "key=str)",
           ("tests/test_mllm_varres.py", "-k", "dataset_items"),
           "a video directory's frames in string order (10.png before 2.png)"),
    # --- the digits study (models/digits): protocol, rates, reproducibility
    Mutant("digits-data-hash-seeded", "models/digits/dataset.py",
           'rng = random.Random(f"{seed}-{split}")',
           'rng = random.Random(hash(f"{seed}-{split}"))',
           ("tests/test_digits.py", "-k", "same_seed"),
           "dataset composition seeded from str hash (differs per interpreter: PYTHONHASHSEED)"),
    Mutant("digits-stage1-trains-lm", "models/digits/run.py",
           "image_folder=str(image_folder), stage=stage,",
           "image_folder=str(image_folder), stage=2,",
           ("tests/test_digits.py", "-k", "aligned_protocol"),
           "stage 1 of the aligned protocol trains the LM too (no projector-only alignment)"),
    Mutant("digits-text-lm-not-loaded", "models/digits/run.py",
           'model.llm.load_state_dict(ctx["lm_for"](seed))',
           'ctx["lm_for"](seed)',
           ("tests/test_digits.py", "-k", "cached_text_lm"),
           "aligned protocol: stage 1 against a fresh LM instead of the text-pretrained one"),
    Mutant("digits-widen-wrong-way", "models/digits/run.py",
           "return [_round_rate(best / widen)]", "return [_round_rate(best * widen)]",
           ("tests/test_digits.py", "-k", "widens"),
           "rate grid widened above when the best rate is on its lower edge"),
    Mutant("digits-check-skips-answers", "models/digits/run.py",
           'CHECKED = ("losses_stage1", "losses", "val_curve", "answers", "accuracy", "val")',
           'CHECKED = ("losses_stage1", "losses", "val_curve", "accuracy", "val")',
           ("tests/test_digits.py", "-k", "compare_results"),
           "--check does not compare the answers"),
    Mutant("digits-dependence-token-mean", "models/digits/run.py",
           "per_token = y.mean(0, keepdim=True)", "per_token = y.mean(1, keepdim=True)",
           ("tests/test_digits.py", "-k", "image_dependence"),
           "image dependence measured around the per-image mean (token variance, not images)"),
    Mutant("digits-rate-ties-larger", "models/digits/run.py",
           'return min(cand, key=lambda r: (-r["val_overall"], r["lr"]))["lr"]',
           'return min(cand, key=lambda r: (-r["val_overall"], -r["lr"]))["lr"]',
           ("tests/test_digits.py", "-k", "widens"),
           "validation ties go to the larger rate (the grid stops widening at a tied lower edge)"),
]

_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                 ".hypothesis", ".pytest_cache", "runs", "*.so")


def apply(mutant: Mutant, root: str) -> None:
    """Apply the first spelling of ``mutant`` whose pattern occurs exactly once; exit 2 if none."""
    for rel, pattern, replacement in mutant.edits():
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        if text.count(pattern) == 1:
            with open(path, "w") as f:
                f.write(text.replace(pattern, replacement))
            return
    print(f"mutant {mutant.id}: no pattern occurs exactly once (stale mutant: update it to the "
          f"source): {[(rel, pattern) for rel, pattern, _ in mutant.edits()]}", file=sys.stderr)
    sys.exit(2)


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        root = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, root, ignore=_IGNORE)
        apply(mutant, root)
        env = dict(os.environ, PYTHONPATH=root)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *mutant.tests]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        elapsed = time.monotonic() - start
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        if proc.returncode == 0:
            return "survived", elapsed, tail[0]
        if proc.returncode == 5:  # no test selected: the mutant's test selection is stale
            return "no-tests", elapsed, tail[0]
        return "killed", elapsed, tail[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = parser.parse_args(argv)
    known = {m.id: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:28s} {m.path:38s} {m.what}")
        return 0
    unknown = [i for i in args.ids if i not in known]
    if unknown:
        parser.error(f"unknown mutant ids {unknown}; --list shows them")
    chosen = [known[i] for i in args.ids] if args.ids else MUTANTS
    for m in chosen:  # every pattern checked before anything runs
        with tempfile.TemporaryDirectory() as tmp:
            for rel, _, _ in m.edits():
                if os.path.exists(os.path.join(ROOT, rel)):
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    shutil.copy(os.path.join(ROOT, rel), os.path.join(tmp, rel))
            apply(m, tmp)
    rows, bad = [], 0
    for m in chosen:
        outcome, seconds, tail = run(m, args.timeout)
        ok = (outcome == "killed") == (m.expect == "kill")
        bad += not ok
        rows.append((m.id, outcome, f"{seconds:.0f} s", "" if ok else "UNEXPECTED", m.what))
        print(f"{m.id:28s} {outcome:9s} {seconds:6.0f} s  {'' if ok else 'UNEXPECTED '}{tail}",
              flush=True)
    print("\n| mutant | outcome | time | | what |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    killed = sum(r[1] == "killed" for r in rows)
    print(f"\n{killed}/{len(rows)} killed; {bad} unexpected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
