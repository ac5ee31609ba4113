"""``MLLMTrainer``: ``transformers.Trainer`` plus what it has no equivalent for.

- per-module learning rates: ``--mm_projector_lr`` for the projector (LLaVA's optimizer groups);
- ``--group_by_modality_length``: every per-device batch is all image records or all text
  records (LLaVA's modality-grouped sampler, written here because Trainer's
  ``group_by_length`` knows no modalities);
- checkpoints that hold what trains and what rebuilds the model: ``trainable.pt`` (the trainable
  tensors), ``projector.pt`` + ``projector_config.json``, ``adapter/`` (LoRA) or ``llm/``
  (a fully trained LLM), ``run_config.json``; the frozen LLM / tower are not copied (Trainer
  would save the whole ``state_dict``);
- crash-safe checkpoints: Trainer writes ``checkpoint-N`` in place, so a crash while saving
  leaves a half-written directory that ``get_last_checkpoint`` would pick. Here the checkpoint
  is written under ``<output_dir>/.saving/`` and renamed to ``checkpoint-N`` once complete;
  :func:`latest_checkpoint` picks the newest ``checkpoint-N`` from the directory names alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

TRAINABLE = "trainable.pt"
RUN_CONFIG = "run_config.json"
STAGING = ".saving"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (None if there is none).

    Complete checkpoints are the only ones named ``checkpoint-N`` (they are renamed from the
    staging directory when fully written); ``trainer_state.json`` must be there too. Nothing is
    loaded to decide.
    """
    d = Path(output_dir)
    if not d.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return str(max(steps)[1]) if steps else None


def modality_grouped_indices(lengths: list[int], batch: int, generator) -> list[int]:
    """A permutation of ``range(len(lengths))`` cut into runs of ``batch`` that are each all
    multimodal (length > 0) or all text (length < 0), sorted by length inside a run; the runs
    are shuffled; the two groups' last partial runs are merged at the end (as LLaVA)."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    runs, tails = [], []
    for group in ([i for i, n in enumerate(lengths) if n > 0],
                  [i for i, n in enumerate(lengths) if n < 0]):
        perm = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        chunks = [sorted(perm[k:k + batch], key=lambda i: -abs(lengths[i]))
                  for k in range(0, len(perm), batch)]
        if chunks and len(chunks[-1]) < batch:
            tails += chunks.pop()
        runs += chunks
    order = torch.randperm(len(runs), generator=generator).tolist()
    return [i for k in order for i in runs[k]] + tails


class ModalityGroupedSampler(Sampler):
    """Sampler over :func:`modality_grouped_indices`, reshuffled per epoch from ``seed``.
    ``batch`` = per-device batch x world size, so each rank's slice of a run is one modality."""

    def __init__(self, lengths: list[int], batch: int, seed: int):
        self.lengths, self.batch, self.seed, self.epoch = list(lengths), int(batch), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch, g))


class MLLMTrainer(Trainer):
    """``Trainer`` for :class:`~models.mllm.model.MLLM` (see the module docstring).

    ``run_config``: the JSON written next to every checkpoint (components, MLLM config, flags).
    """

    def __init__(self, *args, run_config: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config or {}
        self._staging_dir = None

    # -- optimizer / sampler
    def create_optimizer(self, model=None):
        lr = getattr(self.args, "mm_projector_lr", None)
        if self.optimizer is None and lr is not None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = {}
            for n, p in opt_model.named_parameters():
                if p.requires_grad:
                    key = (n.startswith("projector."), n in decay)
                    groups.setdefault(key, []).append(p)
            param_groups = [{"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
                             **({"lr": lr} if proj else {})}
                            for (proj, dec), ps in sorted(groups.items())]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups, **kwargs)
        return super().create_optimizer(model)

    def _get_train_sampler(self, train_dataset=None):
        if getattr(self.args, "group_by_modality_length", False):
            ds = self.train_dataset if train_dataset is None else train_dataset
            return ModalityGroupedSampler(ds.modality_lengths,
                                          self.args.per_device_train_batch_size
                                          * self.args.world_size, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # -- saving / loading
    def save_model(self, output_dir=None, _internal_call=False):
        """Under ZeRO-3 gather the trainable tensors one at a time (Trainer would consolidate
        the whole 16-bit model on rank 0); otherwise Trainer's own."""
        from transformers.integrations import is_deepspeed_zero3_enabled
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            return super().save_model(output_dir, _internal_call)
        import deepspeed
        model = self.accelerator.unwrap_model(self.model)
        state = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                with deepspeed.zero.GatheredParameters([p]):
                    if self.args.should_save:
                        state[n] = p.detach().cpu().clone()
        params = dict(model.named_parameters())
        for n, b in model.projector.state_dict().items():  # persistent buffers
            if f"projector.{n}" not in params:
                state[f"projector.{n}"] = b.detach().cpu().clone()
        if self.args.should_save:
            self._save(output_dir, state_dict=state)

    def _save(self, output_dir=None, state_dict=None):
        """Rank 0 (``args.should_save``); ``state_dict`` is the gathered one under ZeRO-3."""
        from ..projectors.registry import save_projector_config
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise RuntimeError(f"the state dict to save lacks trainable tensors {missing[:5]}")
        trainable = {n: state_dict[n].detach().cpu().clone() for n in names}
        torch.save(trainable, out / TRAINABLE)
        sub = lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items()  # noqa: E731
                              if k.startswith(prefix)}
        torch.save({k: v.detach().cpu() for k, v in sub("projector.").items()},
                   out / "projector.pt")
        save_projector_config(model.projector, out / "projector_config.json")
        if model.is_lora:
            model.llm.save_pretrained(out / "adapter", state_dict=sub("llm."))
        elif any(n.startswith("llm.") for n in names):
            model.llm.save_pretrained(out / "llm", state_dict=sub("llm."))
        with open(out / RUN_CONFIG, "w") as f:
            json.dump(self.run_config, f, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        state = torch.load(Path(resume_from_checkpoint) / TRAINABLE, map_location="cpu")
        want = {n for n, p in model.named_parameters() if p.requires_grad}
        if want - set(state):
            raise ValueError(f"checkpoint {str(resume_from_checkpoint)!r} lacks trainable "
                             f"tensors {sorted(want - set(state))[:5]}")
        model.load_state_dict(state, strict=False)

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save and (staging / name).exists():  # left by a crash
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # an older run's checkpoint of the same step
                shutil.rmtree(final)
            os.replace(staging / name, final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=False)
        self.accelerator.wait_for_everyone()
