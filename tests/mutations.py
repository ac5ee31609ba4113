"""Mutation testing: plant plausible bugs one at a time and check that the tests catch them.

Each mutant is a text edit of one source file (an exact ``pattern`` that must occur exactly once,
and its ``replacement``), applied to a temporary copy of the repository; then the tests that
should kill it run there (``pytest -x``). A mutant is *killed* when they fail, *survived*
when they pass. A pattern that no longer matches the source fails loudly (exit status 2): the
mutant must then be updated to the changed kernel, not silently skipped.

Not part of ``make test`` (it runs pytest ~20 times). Run from the repository root; on a
machine without a GPU with Triton's interpreter (the child runs inherit the environment, as
``make test`` sets it; the tests never set it)::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tests/mutations.py            # all, a table
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tests/mutations.py --list     # ids, descriptions
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tests/mutations.py fwd-1d-window-ceil

A run whose selected tests were all skipped (e.g. Triton tests without a GPU or the
interpreter) is reported as ``skipped``, never as ``survived``.

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
LLAVA = "models/mllm/llava.py"


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
    # --- LLaVA checkpoints in and out (models/mllm/llava.py, tests/test_llava.py)
    Mutant("llava-original-select-layer-ignored", LLAVA,
           'layer = cfg.get("mm_vision_select_layer", -2)', "layer = -2",
           ("tests/test_llava.py", "-k", "original_logits"),
           "original layout: mm_vision_select_layer ignored (LLaVA-1.5's -2 always)"),
    Mutant("llava-hf-feature-layer-default", LLAVA,
           "int(cfg.image_token_id), cfg.vision_feature_layer,", "int(cfg.image_token_id), -2,",
           ("tests/test_llava.py", "-k", "hf_logits"),
           "llava-hf: vision_feature_layer ignored (-2 always)"),
    Mutant("llava-hf-full-drops-cls", LLAVA,
           'select = "cls_patch" if has_cls else "patch"', 'select = "patch"',
           ("tests/test_llava.py", "-k", "hf_logits"),
           "llava-hf: the 'full' strategy drops CLIP's CLS token"),
    Mutant("llava-export-keeps-cls", LLAVA,
           'strategy = "full" if cls_patch or not has_cls else "default"', 'strategy = "full"',
           ("tests/test_llava.py", "-k", "export_loads"),
           "export: 'full' written for a patch-only model (llava-hf keeps the CLS token)"),
    Mutant("llava-hf-projector-transposed", LLAVA,
           '"mlp.2.weight": src.linear_2.weight}', '"mlp.2.weight": src.linear_2.weight.T}',
           ("tests/test_llava.py", "-k", "hf_logits"),
           "llava-hf: linear_2's weight loaded transposed (square: no shape error)"),
    Mutant("llava-original-projector-swapped", LLAVA,
           'state = {f"mlp.{k}": v for k, v in weights.items()}',
           'state = {f"mlp.{2 * depth - 2 - int(k[0])}{k[1:]}": v for k, v in weights.items()}',
           ("tests/test_llava.py", "-k", "original_logits"),
           "original layout: mm_projector.0 and .2 swapped (equal widths: no shape error)"),
    Mutant("llava-export-projector-swapped", LLAVA,
           "linear_1 = model.projector.mlp[0]\n    hf.model.multi_modal_projector.linear_2 = "
           "model.projector.mlp[2]",
           "linear_1 = model.projector.mlp[2]\n    hf.model.multi_modal_projector.linear_2 = "
           "model.projector.mlp[0]",
           ("tests/test_llava.py", "-k", "export_loads"),
           "export: the projector's two Linear layers written as linear_2 / linear_1"),
    Mutant("llava-hf-image-token-off-by-one", LLAVA,
           "int(cfg.image_token_id), cfg.vision_feature_layer,",
           "int(cfg.image_token_id) + 1, cfg.vision_feature_layer,",
           ("tests/test_llava.py", "-k", "hf_logits"),
           "llava-hf: image_token_index read off by one"),
    Mutant("llava-export-image-token-off-by-one", LLAVA,
           "image_token_index=model.image_token_id,", "image_token_index=model.image_token_id + 1,",
           ("tests/test_llava.py", "-k", "export_loads"),
           "export: image_token_index written off by one"),
    Mutant("llava-original-pad-ignored", LLAVA,
           '"pad" if aspect == "pad" else "crop")', '"crop")',
           ("tests/test_llava.py", "-k", "original_logits"),
           "original layout: image_aspect_ratio 'pad' ignored (images cropped)"),
    Mutant("llava-export-no-bos", LLAVA,
           "add_bos = not _adds_bos(tok)", "add_bos = False",
           ("tests/test_llava.py", "-k", "export_loads"),
           "export: the chat template drops BOS for a tokenizer that does not add it"),
    Mutant("llava-export-pad-not-kept", LLAVA,
           'proc = padding_processor(proc, model.image_aspect_ratio == "pad")',
           "proc = padding_processor(proc, False)",
           ("tests/test_llava.py", "-k", "cli_lora"),
           "export of a run trained with pad: the processor does not pad"),
    # --- trainer and data path (issue 25)
    Mutant("label-on-image-in-answer", "models/mllm/conversation.py",
           "labels += ([IGNORE_INDEX if im else t for t, im in zip(ids, is_image)] if train",
           "labels += ([t for t, im in zip(ids, is_image)] if train",
           ("tests/test_mllm.py", "-k", "never_carry_labels"),
           "an <image> inside an answer trains its image positions as targets"),
    Mutant("answer-cut-off-by-one", "models/mllm/conversation.py",
           "if first is None or first >= limit:", "if first is None or first > limit:",
           ("tests/test_mllm.py", "-k", "max_length_cuts"),
           "a record whose first answer token sits exactly at max_length is kept (0 targets)"),
    Mutant("build-check-shortcut-off-by-one", "models/mllm/conversation.py",
           "            first = pos\n", "            first = pos + 1\n",
           ("tests/test_mllm.py", "-k", "agrees_with_full"),
           "the build-time check places an answer's first target one position late"),
    Mutant("image-cut-counted-past-limit", "models/mllm/conversation.py",
           "images_left -= sum(is_image[:max(0, min(len(ids), limit - pos))])",
           "images_left -= sum(is_image)",
           ("tests/test_mllm_varres.py", "-k", "answer_cut"),
           "image tokens past max_length counted as kept (the cut images go unreported)"),
    Mutant("conversations-checked-only-when-read", "models/mllm/data.py",
           "why = truncation_problem(tokenizer, rec[\"conversations\"],",
           "why = None and truncation_problem(tokenizer, rec[\"conversations\"],",
           ("tests/test_mllm.py", "-k", "bad_only_when_read"),
           "roles / template / max_length problems found when read (per epoch), not at build"),
    Mutant("native-build-counts-nominal", "models/mllm/data.py",
           "counts.append(int(self.tokens_for_grid((h // self.patch_size,",
           "counts.append(self.num_image_tokens + 0 * int(self.tokens_for_grid((h // "
           "self.patch_size,",
           ("tests/test_mllm_varres.py", "-k", "answer_cut"),
           "the build-time max_length check counts every native image at the nominal size"),
    Mutant("read-failure-warned-every-epoch", "models/mllm/data.py",
           "if j in self._failed:", "if False:",
           ("tests/test_mllm.py", "-k", "bad_only_when_read"),
           "a record that fails when read is warned about (and re-read) every epoch"),
    Mutant("chat-template-unchecked-at-build", "models/mllm/data.py",
           'if template == "chat_template" and not getattr(tokenizer, "chat_template", None):',
           "if False:",
           ("tests/test_mllm.py", "-k", "chat_template_without_one"),
           "--version chat_template with a tokenizer without one fails record by record"),
    Mutant("modality-length-zero", "models/mllm/data.py",
           "out.append(n + n_img if files else -max(1, n))",
           "out.append(n + n_img if files else -n)",
           ("tests/test_mllm.py", "-k", "never_zero"),
           "a text record with no words gets the length estimate 0 (no modality)"),
    Mutant("sampler-drops-zero-length", "models/mllm/trainer.py",
           "[i for i, n in enumerate(lengths) if n <= 0]):",
           "[i for i, n in enumerate(lengths) if n < 0]):",
           ("tests/test_mllm.py", "-k", "every_record_once"),
           "--group_by_modality_length never yields a record whose length estimate is 0"),
    Mutant("checkpoints-by-name", "models/mllm/trainer.py",
           "return sorted((int(m.group(1)), p) for p in d.iterdir()",
           "return sorted((m.group(1), p) for p in d.iterdir()",
           ("tests/test_train.py", "-k", "newest_complete"),
           "checkpoints ordered by name (checkpoint-9 after checkpoint-10)"),
    Mutant("latest-unverified", "models/mllm/trainer.py",
           "            verify_checkpoint(path)\n        except ValueError as e:",
           "            pass\n        except ValueError as e:",
           ("tests/test_train.py", "-k", "newest_complete or truncated_checkpoint"),
           "resume 'latest' takes the newest checkpoint-N without checking its files"),
    Mutant("manifest-sizes-only", "models/mllm/trainer.py",
           "if bad or len(hashes[name]) != len(want):", "if False:",
           ("tests/test_train.py", "-k", "newest_complete"),
           "a checkpoint file of the right size but other bytes passes verification"),
    Mutant("manifest-top-level-only", "models/mllm/trainer.py",
           'for p in root.rglob("*")', 'for p in root.glob("*")',
           ("tests/test_train.py", "-k", "newest_complete"),
           "the manifest leaves out subdirectories (DeepSpeed's global_stepN shards)"),
    Mutant("explicit-resume-unverified", "models/mllm/trainer.py",
           "        verify_checkpoint(path)\n        return str(path)",
           "        return str(path)",
           ("tests/test_train.py", "-k", "newest_complete"),
           "an explicitly named damaged checkpoint is loaded (bare errors deep in torch)"),
    Mutant("rotation-by-mtime", "models/mllm/trainer.py",
           "best_model_checkpoint=best_model_checkpoint, use_mtime=False)",
           "best_model_checkpoint=best_model_checkpoint, use_mtime=True)",
           ("tests/test_train.py", "-k", "newest_complete"),
           "save_total_limit rotation by modification time instead of step number"),
    Mutant("weight-decay-on-everything", "models/mllm/trainer.py",
           '"weight_decay": self.args.weight_decay if dec else 0.0,',
           '"weight_decay": self.args.weight_decay,',
           ("tests/test_train.py", "-k", "weight_decay"),
           "biases and norm weights decayed (in the --mm_projector_lr groups)"),
    Mutant("projector-kwargs-unchecked", "models/mllm/train.py",
           "    projector_kwargs(margs)\n    if margs.mm_vision_select_feature",
           "    if margs.mm_vision_select_feature",
           ("tests/test_train.py", "-k", "projector_kwargs_name"),
           "invalid --projector_kwargs JSON fails later with a bare JSONDecodeError"),
    Mutant("tower-never-unfrozen", "models/mllm/train.py",
           "model.set_vision_tower_trainable(margs.unfreeze_mm_vision_tower)",
           "model.set_vision_tower_trainable(False)",
           ("tests/test_train.py", "-k", "unfrozen"),
           "--unfreeze_mm_vision_tower leaves the tower frozen",
           alternatives=(("models/mllm/train.py",
                          "model.vision_tower.requires_grad_(margs.unfreeze_mm_vision_tower)",
                          "model.vision_tower.requires_grad_(False)"),)),
    Mutant("tower-forward-without-grad", MLLM,
           "frozen = not any(p.requires_grad for p in self.vision_tower.parameters())",
           "frozen = True",
           ("tests/test_train.py", "-k", "unfrozen"),
           "the tower always runs under no_grad: an unfrozen tower gets no gradient"),
    Mutant("half-model-not-cast", "models/mllm/train.py",
           "        cast_for_training(model, compute_dtype(targs))",
           "        pass",
           ("tests/test_train.py", "-k", "half_precision"),
           "a half-precision model given to train() trains fp16 weights (no fp32 masters)"),
    # --- LLaVA review fixes: image policies, SentencePiece prompts, trained tower
    Mutant("data-processor-pads-behind-policy", "models/mllm/data.py",
           'return {"do_pad": False} if getattr(processor, "do_pad", None) else {}',
           "return {}",
           ("tests/test_llava.py", "-k", "policies"),
           "dataset: a padding image processor (LlavaImageProcessor do_pad) pads under the crop "
           "and native policies"),
    Mutant("mllm-preprocess-ignores-aspect", MLLM,
           "self.image_aspect_ratio) for im in images])", '"crop") for im in images])',
           ("tests/test_llava.py", "-k", "policies"),
           "MLLM.preprocess_images (chat, MME) crops whatever the training policy"),
    Mutant("train-aspect-not-recorded", "models/mllm/train.py",
           "model.image_aspect_ratio = dargs.image_aspect_ratio  # chat",
           "pass  # chat",
           ("tests/test_llava.py", "-k", "trained_tower"),
           "trainer: --image_aspect_ratio not recorded in the model config (chat / export pad "
           "a crop-trained model)"),
    Mutant("export-drops-trained-tower", "models/mllm/train.py",
           'if rc.get("model_args", {}).get("unfreeze_mm_vision_tower"):', "if False:",
           ("tests/test_llava.py", "-k", "trained_tower"),
           "load_checkpoint_model / export: the tower trained with --unfreeze_mm_vision_tower "
           "replaced by the base one"),
    Mutant("llava-export-image-no-prefix", LLAVA,
           'IMAGE_PLACEHOLDER + "\\n", IMAGE_PLACEHOLDER + " \\n"):',
           'IMAGE_PLACEHOLDER + "\\n",):',
           ("tests/test_llava.py", "-k", "sentencepiece"),
           "export: '<image>\\n' only: a non-legacy SentencePiece tokenizer loses the '▁' "
           "training puts after each image"),
    Mutant("llava-export-image-space-always", LLAVA,
           'IMAGE_PLACEHOLDER + "\\n", IMAGE_PLACEHOLDER + " \\n"):',
           'IMAGE_PLACEHOLDER + " \\n",):',
           ("tests/test_llava.py", "-k", "sentencepiece"),
           "export: '<image> \\n' always: a legacy SentencePiece tokenizer gets two '▁'"),
    Mutant("llava-export-double-bos", LLAVA,
           "add_bos = not _adds_bos(tok)", "add_bos = True",
           ("tests/test_llava.py", "-k", "sentencepiece"),
           "export: the chat template adds BOS for a tokenizer that adds it too (two BOS)"),
    Mutant("llava-mm-hidden-checked-on-swap", LLAVA,
           "if keep_projector and mm_hidden is not None", "if mm_hidden is not None",
           ("tests/test_llava.py", "-k", "another_tower"),
           "original layout: mm_hidden_size checked against a new tower when the projector is "
           "replaced (refused for no reason)"),
    # --- tests that hold on CUDA, ops independent of the default device (issue 22)
    Mutant("plan-host-table-default-device", "pargo_kernels/varlen_plan.py",
           'host = torch.tensor(rows, dtype=torch.int64, device="cpu")',
           "host = torch.tensor(rows, dtype=torch.int64)",
           ("tests/test_default_device.py", "-k", "plans_do_not"),
           "a varlen plan's host table built on torch's default device (CUDA default: "
           "pin_memory() fails; meta: no data)"),
    Mutant("delta-schedule-default-device", "pargo_kernels/ops/varlen_triton.py",
           "table = torch.zeros((tiles, _aplan.ENTRY), dtype=torch.int32, device=device)\n"
           "    table[:, 0] = torch.arange(tiles, dtype=torch.int32, device=device) * block_m\n"
           "    return table",
           "table = torch.zeros((tiles, _aplan.ENTRY), dtype=torch.int32)\n"
           "    table[:, 0] = torch.arange(tiles, dtype=torch.int32) * block_m\n"
           "    return table.to(device)",
           ("tests/test_default_device.py", "-k", "launchers"),
           "the varlen fp32 backward's delta schedule allocated on the default device"),
    Mutant("conftest-forces-interpreter", "tests/conftest.py",
           "_INTERPRET_AT_START = os.environ.get(\"TRITON_INTERPRET\")",
           "os.environ.setdefault(\"TRITON_INTERPRET\", \"1\")\n"
           "_INTERPRET_AT_START = os.environ.get(\"TRITON_INTERPRET\")",
           ("tests/test_suite_setup.py", "-k", "no_test_sets"),
           "the test setup chooses the interpreter itself (hides CPU-tensor assumptions that "
           "fail on a CUDA machine)"),
    Mutant("conftest-bf16-truncates", "tests/conftest.py",
           "    if not INTERPRET:\n        return\n    import numpy as np",
           "    return\n    import numpy as np",
           ("tests/test_suite_setup.py", "-k", "nearest"),
           "the interpreter's fp32 -> bf16 cast left truncating (the conftest's round-to-nearest "
           "patch not applied)"),
    # --- the GPU test profile (tests/test_gpu_profile.py): key splits and the varlen paths
    Mutant("split-merge-natural-exp", ATT,
           "w = torch.exp2(lws - m_safe)", "w = torch.exp(lws - m_safe)",
           ("tests/test_gpu_profile.py", "-k", "split and fp32"),
           "key splits of global tiles merged with e^x weights of base-2 log-sum-exps"),
    Mutant("varlen-split-delta-first-slot", "pargo_kernels/ops/varlen_triton.py",
           "delta.index_copy_(1, idx, dws.sum(1))", "delta.index_copy_(1, idx, dws[:, 0])",
           ("tests/test_gpu_profile.py", "-k", "pg1d-varlen and bf16"),
           "16-bit varlen dQ of split sequences: delta from the first key split only"),
    Mutant("varlen-project-bias-first-feature", "pargo_kernels/ops/varlen_pool_triton.py",
           "acc += tl.load(BIAS + feats * sbc, mask=f_ok, other=0.0)",
           "acc += tl.load(BIAS + feats * sbc * 0, mask=f_ok, other=0.0)",
           ("tests/test_gpu_profile.py", "-k", "pool-project-varlen and fp16"),
           "fused varlen pooling + projection adds bias[0] to every feature"),
    # --- setup.py: an explicit CUDA build request fails loudly
    Mutant("setup-explicit-build-failure-swallowed", "setup.py",
           "            raise\n        print(f\"pargo_kernels: CUDA extension {ext_name} skipped",
           "            pass\n        print(f\"pargo_kernels: CUDA extension {ext_name} skipped",
           ("tests/test_setup_cuda.py",),
           "PARGO_BUILD_CUDA=1 and the extension's build fails: the install goes on without it"),
    Mutant("setup-explicit-request-skipped-silently", "setup.py",
           "        if mode == \"on\":\n            sys.exit(",
           "        if mode == \"never\":\n            sys.exit(",
           ("tests/test_setup_cuda.py",),
           "PARGO_BUILD_CUDA=1 without a CUDA torch / nvcc: skipped as in auto mode"),
    # --- the one GPU call (benchmarks/gpu_run.sh) and its benchmark runner
    Mutant("gpu-run-no-exit-trap", "benchmarks/gpu_run.sh",
           "trap finish EXIT", "true",
           ("tests/test_gpu_run.py", "-k", "dry_run_summary"),
           "gpu_run.sh ends without its summary and pack (OUTDIR: the live log only)"),
    Mutant("run-all-no-merge-on-sigint", "benchmarks/run_all.py",
           "    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, "
           "signal.SIGTERM)}",
           "    old_handlers = {}",
           ("tests/test_gpu_run.py", "-k", "run_all"),
           "run_all.py stopped by SIGINT dies without merging what it measured"),
    Mutant("profile-cpu-head-dim-differs", "tests/test_gpu_profile.py",
           "    B, h = (1, 1) if small else (2, H)\n    q = _randn(",
           "    B, h = (1, 1) if small else (2, H)\n    D = 32 if small else 64\n    q = _randn(",
           ("tests/test_gpu_plan.py",),
           "the profile's CPU shapes compile other kernels than its GPU shapes (head dim 32)"),
    # --- issue 25: huge ints, 2-D windows over several tiles, key splits, varlen bias
    Mutant("band-reference-window-unclipped", "pargo_kernels/masks.py",
           "return (d >= -min(self.left, self.n)) & (d <= min(self.right, self.n))",
           "return (d >= -self.left) & (d <= self.right)",
           ("tests/test_int_limits.py", "-k", "every_backend and reference"),
           "the reference band mask compares with the unclipped window: a window of 2**64 "
           "overflows (the Triton and CUDA paths clip it)"),
    Mutant("varlen-band-shared-window-unclipped", "pargo_kernels/varlen.py",
           "window = (min(band.left, _MAX_TOKENS), min(band.right, _MAX_TOKENS))",
           "window = (band.left, band.right)",
           ("tests/test_int_limits.py", "-k", "varlen_huge and shared"),
           "band_attention_varlen passes a window >= 2**63 to the op unclipped (torch's "
           "'Expected a value of type List[int]' instead of the fixed-shape op's clipping)"),
    Mutant("varlen-band-names-cu-seqlens-q", "pargo_kernels/varlen_plan.py",
           'self.check_length("q", n_q, A_Q_START, "cu_seqlens" if band else "cu_seqlens_q")',
           'self.check_length("q", n_q, A_Q_START, "cu_seqlens_q")',
           ("tests/test_int_limits.py", "-k", "name_cu_seqlens"),
           "band_attention_varlen's length error names cu_seqlens_q, an argument it has not"),
    Mutant("plan-2d-window-end-floor", PLAN,
           "((r + 1) * P[1] + P[3] - 1) // P[3] * P[2]",
           "((r + 1) * P[1]) // P[3] * P[2]",
           ("tests/test_attention.py", "-k", "several_query_tiles"),
           "2-D tile key range / dK/dV rows with the window end rounded down (uneven ratios: a "
           "tile misses its last key row); before issue 25 only the work model's dot count "
           "(CPU) and the fuzz by chance saw it, no oracle test"),
    Mutant("dkdv-2d-inverse-assumes-disjoint-windows", PLAN,
           'q_lo = np.searchsorted(hi, n0, side="right")\n',
           'q_lo = np.searchsorted(hi, n0, side="right")\n'
           "        if p.kind in (KIND_PG1D, KIND_PG2D):  # the row owning key n0\n"
           "            q_lo = np.searchsorted(lo, lo[np.maximum(np.searchsorted(lo, n0, "
           '"right") - 1, 0)])\n',
           ("tests/test_attention.py", "-k", "several_query_tiles"),
           "dK/dV key tiles start at the partial row owning their first key, as if windows "
           "tiled the keys: overlapping 2-D windows (uneven ratio) lose the earlier grid row"),
    Mutant("varlen-split-chunk-floor", "pargo_kernels/varlen_plan.py",
           "chunks = [_cdiv(_cdiv(b, n_split), SPLIT_ALIGN) * SPLIT_ALIGN if s else b",
           "chunks = [_cdiv(b // n_split, SPLIT_ALIGN) * SPLIT_ALIGN if s else b",
           ("tests/test_varlen_split.py", "-k", "not_a_multiple"),
           "varlen key-split chunks of floor(Nv / S) keys: the last keys of a sequence whose "
           "count S does not divide are never visited (e.g. 1537 keys, S = 3)"),
    Mutant("varlen-pool-project-bias-stride-ignored", "pargo_kernels/ops/varlen_pool_triton.py",
           "acc += tl.load(BIAS + feats * sbc, mask=f_ok, other=0.0)",
           "acc += tl.load(BIAS + feats, mask=f_ok, other=0.0)",
           ("tests/test_varlen.py", "-k", "bias_strides"),
           "the fused varlen pooling + projection reads the bias as contiguous (a strided or "
           "expanded bias gives other elements)"),
    Mutant("varlen-pool-project-autocast-skips-bias", "pargo_kernels/varlen.py",
           '@autocast_like_sdpa("x", "weight", "bias")  # as F.linear',
           '@autocast_like_sdpa("x", "weight")  # as F.linear',
           ("tests/test_varlen.py", "-k", "autocast_with_bias"),
           "under autocast the varlen pooling + projection leaves the bias in fp32 (a dtype "
           "error where F.linear casts it)"),
    Mutant("best-checkpoint-staging-path", "models/mllm/trainer.py",
           "            if best == self.state.global_step or final_best.is_dir():",
           "            if final_best.is_dir():",
           ("tests/test_train_best.py",),
           "the best checkpoint of the step being saved is recorded by its staging path "
           "(rotation then deletes it, load_best_model_at_end cannot find it)"),
    Mutant("best-checkpoint-state-not-rewritten", "models/mllm/trainer.py",
           "            self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))",
           "            pass",
           ("tests/test_train_best.py",),
           "the checkpoint's trainer_state.json keeps the staging path of the best checkpoint"),
    Mutant("best-model-not-loaded", "models/mllm/trainer.py",
           "        self._load_from_checkpoint(best)\n",
           "        super()._load_best_model()\n",
           ("tests/test_train_best.py",),
           "load_best_model_at_end looks for Trainer's whole-model weights file, finds none, "
           "keeps the last step's weights"),
    Mutant("tower-unused-layers-trainable", MLLM,
           "        self.vision_tower.requires_grad_(False)\n        if trainable:",
           "        self.vision_tower.requires_grad_(trainable)\n        if trainable:",
           ("tests/test_mllm.py", "-k", "unfrozen_tower"),
           "--unfreeze_mm_vision_tower marks the layers after the feature layer, the "
           "post-layernorm and the head trainable (no gradient; DDP unused parameters)"),
    Mutant("tower-feature-layer-off-by-one", MLLM,
           "if int(name[len(prefix):].split(\".\", 1)[0]) < deepest:",
           "if int(name[len(prefix):].split(\".\", 1)[0]) < deepest - 1:",
           ("tests/test_mllm.py", "-k", "unfrozen_tower"),
           "the last tower layer that feeds the features is left frozen"),
    Mutant("tower-embeddings-frozen", MLLM,
           "    used = dict(params[:where[0]])",
           "    used = {}",
           ("tests/test_train.py", "-k", "unfrozen"),
           "an unfrozen tower's embeddings and pre-layernorm stay frozen"),
    Mutant("loss-float64-downcast", MLLM,
           "            if shift_logits.element_size() < 4:  # 16-bit logits",
           "            if True:  # 16-bit logits",
           ("tests/test_mllm.py", "-k", "logits_precision"),
           "a float64 model's loss is computed from float32 logits"),
    Mutant("loss-16bit-not-upcast", MLLM,
           "            if shift_logits.element_size() < 4:  # 16-bit logits",
           "            if False:  # 16-bit logits",
           ("tests/test_mllm.py", "-k", "logits_precision"),
           "the cross entropy of bf16 / fp16 logits runs in 16 bits"),
    Mutant("best-model-unverified", "models/mllm/trainer.py",
           "            verify_checkpoint(best)\n            return True",
           "            return True",
           ("tests/test_train_best.py",),
           "load_best_model_at_end loads a damaged best checkpoint without checking its manifest"),
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
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rN", "-p", "no:cacheprovider",
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
            if " passed" not in tail[0]:  # every selected test skipped: nothing was judged
                return "skipped", elapsed, tail[0]
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
        ok = outcome != "skipped" and (outcome == "killed") == (m.expect == "kill")
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
