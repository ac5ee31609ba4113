"""The trainer's best checkpoint (``metric_for_best_model`` / ``load_best_model_at_end``) with
checkpoints staged under ``<output_dir>/.saving/`` and renamed: recorded at its final path,
kept by rotation, loaded at the end; tiny models from test_train's fixtures."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import transformers as tf  # noqa: E402

from models.mllm.data import Collator, LLaVADataset  # noqa: E402
from models.mllm.train import build_model, parse_args  # noqa: E402
from models.mllm.trainer import MLLMTrainer, resolve_resume, verify_checkpoint  # noqa: E402
from test_train import _paths, _trainable, disk  # noqa: E402,F401 (the fixture)


class _Record(tf.TrainerCallback):
    """After each save: the trainer_state.json of the checkpoint just written (its recorded
    best checkpoint), the checkpoint directories present, and the manifest check; at each step
    end the trainable weights (the last step's are those load_best_model_at_end replaces)."""

    def __init__(self, out):
        self.out, self.saves, self.last = Path(out), [], None

    def on_save(self, args, state, control, **kw):
        ck = self.out / f"checkpoint-{state.global_step}"
        verify_checkpoint(ck)  # the manifest covers the rewritten trainer_state.json
        saved = json.loads((ck / "trainer_state.json").read_text())
        self.saves.append((state.global_step, saved["best_model_checkpoint"],
                           sorted(p.name for p in self.out.glob("checkpoint-*"))))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.last = {n: p.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad}


def test_best_checkpoint_survives_rotation_and_is_loaded_at_the_end(disk, tmp_path):
    """Eval at every save, greater_is_better on eval_loss (the loss falls, so the first
    checkpoint is the best), save_total_limit=1: each saved trainer_state.json names the best
    checkpoint by its final path, rotation keeps it beside the newest, load_best_model_at_end
    loads its weights (not the last step's), verified (a damaged file is refused), and it is
    the checkpoint a resume verifies."""
    out = tmp_path / "best"
    margs, _, targs = parse_args(_paths(
        disk, out, stage=1, max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2,
        learning_rate=1e-2, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True, per_device_eval_batch_size=8))
    tf.set_seed(targs.seed)
    model = build_model(margs, targs)
    ds = LLaVADataset(disk["data"], disk["images"], model.tokenizer, model.image_processor,
                      image_token_id=model.image_token_id,
                      num_image_tokens=model.num_visual_tokens, template="plain")
    rec = _Record(out)
    trainer = MLLMTrainer(model=model, args=targs, train_dataset=ds, eval_dataset=ds,
                          data_collator=Collator(model.tokenizer.pad_token_id, "right"),
                          callbacks=[rec])
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == [2, 4, 6]
    best = max(evals, key=evals.get)
    assert best < 6, evals  # an early checkpoint is the best: rotation would delete it
    want = str(out / f"checkpoint-{best}")
    assert trainer.state.best_model_checkpoint == want
    for step, recorded, present in rec.saves:
        top = max(v for k, v in evals.items() if k <= step)
        at = min(k for k, v in evals.items() if k <= step and v == top)
        assert recorded == str(out / f"checkpoint-{at}"), (step, recorded)
        assert present == sorted({f"checkpoint-{at}", f"checkpoint-{step}"}), (step, present)
    # Trainer's end of training with save_total_limit=1 keeps the best only
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{best}"]
    assert not list((out / ".saving").iterdir())
    kept = _trainable(want)
    assert set(kept) == set(rec.last)
    assert any(not torch.equal(kept[n], rec.last[n]) for n in kept)  # the load changes them
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), kept[n]), n
    verify_checkpoint(want)
    assert resolve_resume(out, "latest") == want
    weights = Path(want) / "trainable.pt"  # damaged: refused, naming the file
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    with pytest.raises(ValueError, match=rf"checkpoint-{best}.*trainable\.pt"):
        trainer._load_best_model()
