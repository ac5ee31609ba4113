"""``MLLMTrainer``: ``transformers.Trainer`` plus what it has no equivalent for.

- per-module learning rates: ``--mm_projector_lr`` for the projector (LLaVA's optimizer groups);
- ``--group_by_modality_length``: every per-device batch is all image records or all text
  records (LLaVA's modality-grouped sampler, written here because Trainer's
  ``group_by_length`` knows no modalities);
- checkpoints that hold what trains and what rebuilds the model: ``trainable.pt`` (the trainable
  tensors), ``projector.pt`` + ``projector_config.json``, ``adapter/`` (LoRA) or ``llm/``
  (a fully trained LLM), ``run_config.json``; the frozen LLM / tower are not copied (Trainer
  would save the whole ``state_dict``);
- crash-safe, verified checkpoints: Trainer writes ``checkpoint-N`` in place, so a crash while
  saving leaves a half-written directory that ``get_last_checkpoint`` would pick. Here the
  checkpoint is written under ``<output_dir>/.saving/``; once every process has written its
  part (DeepSpeed shards included), the main process records ``checkpoint_manifest.json``
  (every file's size and the sha256 of each 64 MiB block), flushes the files to disk (fsync)
  and renames the directory to ``checkpoint-N``. :func:`latest_checkpoint` takes the highest
  step N whose files match their manifest, warning about each newer one it skips (which file,
  why) and deleting nothing; :func:`resolve_resume` also refuses an explicitly named
  checkpoint that does not match, naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import SaveStrategy, rotate_checkpoints

TRAINABLE = "trainable.pt"
RUN_CONFIG = "run_config.json"
STAGING = ".saving"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


MANIFEST = "checkpoint_manifest.json"
_BLOCK = 64 << 20  # hashed in blocks: the blocks of one large file hash in parallel
_VERIFIED: dict[str, list] = {}  # checkpoint -> its files' (size, mtime) when hashed good here


def _hash_block(path: Path, index: int) -> str:
    h, left = hashlib.sha256(), _BLOCK
    buf = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        f.seek(index * _BLOCK)
        while left:
            n = f.readinto(buf[:min(len(buf), left)])
            if not n:
                break
            h.update(buf[:n])
            left -= n
    return h.hexdigest()


def _hash_files(root: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """``{name: [sha256 of each block]}`` of the files under ``root``, on several threads
    (hashlib and file reads release the GIL)."""
    jobs = [(name, i) for name, size in sizes.items() for i in range(-(-size // _BLOCK) or 1)]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1, len(jobs) or 1)) as ex:
        digests = list(ex.map(lambda job: _hash_block(root / job[0], job[1]), jobs))
    out: dict[str, list[str]] = {name: [] for name in sizes}
    for (name, _), d in zip(jobs, digests):
        out[name].append(d)
    return out


def _fsync(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(checkpoint) -> dict:
    """Record what ``checkpoint`` holds in its ``checkpoint_manifest.json``: every file (paths
    relative to it, subdirectories included) with its size and the sha256 of each 64 MiB block;
    the files are fsynced first and the manifest is written atomically, last."""
    root = Path(checkpoint)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != MANIFEST)
    for name in files:
        _fsync(root / name)
    sizes = {name: (root / name).stat().st_size for name in files}
    hashes = _hash_files(root, sizes)
    manifest = {"format": 1, "block_bytes": _BLOCK,
                "files": {n: {"size": sizes[n], "sha256": hashes[n]} for n in files}}
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    for d in {(root / n).parent for n in files} | {root}:
        _fsync(d, directory=True)
    return manifest


def verify_checkpoint(checkpoint) -> None:
    """Check that every file ``checkpoint``'s manifest lists is there with its recorded size and
    block hashes; ``ValueError`` naming the checkpoint, the first bad file and why otherwise
    (also when the manifest is missing or unreadable)."""
    root = Path(checkpoint)
    where = f"checkpoint {str(root)!r}"
    man_path = root / MANIFEST
    if not root.is_dir():
        raise ValueError(f"{where} is not a directory")
    if not man_path.is_file():
        raise ValueError(f"{where} has no {MANIFEST} (its save did not finish, or another "
                         f"trainer wrote it): it cannot be verified")
    try:
        man = json.loads(man_path.read_text())
        files = {n: (int(e["size"]), list(e["sha256"])) for n, e in man["files"].items()}
        if man.get("block_bytes", _BLOCK) != _BLOCK:
            raise ValueError(f"block size {man.get('block_bytes')} (this version: {_BLOCK})")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from e
    stamp = [man_path.stat().st_mtime_ns]
    for name, (size, _) in files.items():
        path = root / name
        if not path.is_file():
            raise ValueError(f"{where}: {name} is missing (listed in {MANIFEST})")
        st = path.stat()
        stamp.append((name, st.st_size, st.st_mtime_ns))
        got = st.st_size
        if got != size:
            raise ValueError(f"{where}: {name} is {got} bytes, its manifest recorded {size} "
                             f"bytes ({'truncated' if got < size else 'grown'} since it was "
                             f"written)")
    key = str(root.resolve())
    if _VERIFIED.get(key) == stamp:  # hashed in this process, no file changed since
        return
    hashes = _hash_files(root, {n: size for n, (size, _) in files.items()})
    for name, (_, want) in files.items():
        bad = [i for i, (a, b) in enumerate(zip(hashes[name], want)) if a != b]
        if bad or len(hashes[name]) != len(want):
            raise ValueError(f"{where}: {name}: the sha256 of its bytes from offset "
                             f"{bad[0] * _BLOCK if bad else 0} differs from the manifest's "
                             f"(corrupted since it was written)")
    _VERIFIED[key] = stamp


def step_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """``(N, path)`` of the ``checkpoint-N`` directories of ``output_dir``, by step number
    (checkpoint-10 after checkpoint-9), oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir()
                  if (m := _CKPT.match(p.name)) and p.is_dir())


def latest_checkpoint(output_dir) -> str | None:
    """The ``checkpoint-N`` of ``output_dir`` with the highest N whose files match its manifest
    (:func:`verify_checkpoint`), or None. Each newer checkpoint it passes over is named in a
    warning with the reason (the file, truncated / corrupted / missing, or no manifest);
    nothing is deleted."""
    for _, path in reversed(step_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        return str(path)
    return None


def _on_main_process(fn):
    """``fn()`` on rank 0 only (hashing a checkpoint once, not once per rank), its result or
    its ``ValueError`` given to every rank; a plain call outside torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ValueError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def resolve_resume(output_dir, resume) -> str | None:
    """The checkpoint to resume from: None for None / False / ""; the newest complete one of
    ``output_dir`` for ``"latest"`` / True (``ValueError`` when there is none); an explicit
    path after :func:`verify_checkpoint` (``ValueError`` naming the damaged file; a checkpoint
    without a manifest, written by another trainer, is used with a warning)."""
    if resume is None or resume is False or resume == "":
        return None

    def resolve():
        if resume is True or resume in ("latest", "true", "True"):
            path = latest_checkpoint(output_dir)
            if path is None:
                raise ValueError(f"resume_from_checkpoint='latest' but {str(output_dir)!r} has "
                                 f"no complete checkpoint-N (any skipped are named in the "
                                 f"warnings above; name one explicitly to use it)")
            return path
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"resume_from_checkpoint {str(resume)!r} is not a directory")
        if not (path / MANIFEST).is_file():
            warnings.warn(f"checkpoint {str(path)!r} has no {MANIFEST}: resuming from it "
                          f"unverified", stacklevel=3)
            return str(path)
        verify_checkpoint(path)
        return str(path)

    return _on_main_process(resolve)


def rotate_step_checkpoints(output_dir, save_total_limit, best_model_checkpoint) -> None:
    """Trainer's rotation (``save_total_limit``), ordered by step number."""
    rotate_checkpoints(output_dir=str(output_dir), save_total_limit=save_total_limit,
                       best_model_checkpoint=best_model_checkpoint, use_mtime=False)


def _gen_device(generator) -> torch.device:
    """Where ``generator`` draws (the CPU without one): a permutation drawn there, not on the
    default device."""
    return torch.device("cpu") if generator is None else generator.device


def modality_grouped_indices(lengths: list[int], batch: int, generator) -> list[int]:
    """A permutation of ``range(len(lengths))`` (every index once, whatever the lengths) cut
    into runs of ``batch`` that are each all multimodal (length > 0) or all text (length <= 0:
    an estimate of 0 is text), sorted by length inside a run; the runs are shuffled; the two
    groups' last partial runs are merged at the end (as LLaVA)."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    runs, tails = [], []
    for group in ([i for i, n in enumerate(lengths) if n > 0],
                  [i for i, n in enumerate(lengths) if n <= 0]):
        drawn = torch.randperm(len(group), generator=generator, device=_gen_device(generator))
        perm = [group[j] for j in drawn.tolist()]
        chunks = [sorted(perm[k:k + batch], key=lambda i: -abs(lengths[i]))
                  for k in range(0, len(perm), batch)]
        if chunks and len(chunks[-1]) < batch:
            tails += chunks.pop()
        runs += chunks
    order = torch.randperm(len(runs), generator=generator,
                           device=_gen_device(generator)).tolist()
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

    def _load_best_model(self):
        """``load_best_model_at_end``: the trainable tensors of ``state.best_model_checkpoint``
        (Trainer's own looks for a whole-model ``pytorch_model.bin`` / ``model.safetensors``,
        which these checkpoints do not hold), verified against its manifest first; DeepSpeed:
        Trainer's (the engine's own checkpoint)."""
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint

        def check():  # on rank 0, every rank taking part in the broadcast
            if not (Path(best) / MANIFEST).is_file():
                return False
            verify_checkpoint(best)
            return True

        if not _on_main_process(check):
            warnings.warn(f"best checkpoint {best!r} has no {MANIFEST}: loading it unverified",
                          stacklevel=2)
        self._load_from_checkpoint(best)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Trainer's, with ``resume_from_checkpoint`` resolved by :func:`resolve_resume`
        ("latest" / True: the newest complete checkpoint; a path: verified first)."""
        resume = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save and (staging / name).exists():  # left by a crash
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        best_before = self.state.best_model_checkpoint
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        # Trainer records the best checkpoint only if it finds it under its run directory,
        # here the staging one: the current step's (a path about to be renamed away) or, for
        # an older best step, none (so rotation would delete it). Point it at the final
        # directory, and rewrite the staged trainer_state.json before the manifest covers it.
        best = self.state.best_global_step
        self.state.best_model_checkpoint = best_before
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH,
                                       SaveStrategy.BEST) and best:
            final_best = run_dir / f"checkpoint-{best}"
            if best == self.state.global_step or final_best.is_dir():
                self.state.best_model_checkpoint = str(final_best)
        if self.args.should_save:
            self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank's files (DeepSpeed shards) written
        if self.args.should_save:
            write_manifest(staging / name)
            final = run_dir / name
            if final.exists():  # an older run's checkpoint of the same step
                shutil.rmtree(final)
            os.replace(staging / name, final)
            _fsync(run_dir, directory=True)
            rotate_step_checkpoints(run_dir, self.args.save_total_limit,
                                    self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
