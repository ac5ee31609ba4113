"""The trainer on CPU: both stages, exact resume, merged export, DeepSpeed ZeRO-2, torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from models.mllm.data import TOY_WORDS, Collator, LLaVADataset, write_toy_dataset  # noqa: E402
from models.mllm import MLLM, tiny_components  # noqa: E402
from models.mllm.train import TrainConfig, export_merged, load_checkpoint_model, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = dict(global_batch_size=8, per_device_batch_size=4, max_steps=4, warmup_ratio=0.0,
              progress=False, seed=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), 16, seed=0)


@pytest.fixture(scope="module")
def stage1(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    res = train(TrainConfig(output_dir=str(out), data_path=str(toy),
                            image_folder=str(toy.parent / "images"), stage=1, learning_rate=1e-2,
                            save_steps=2, log_sample_ids=True, **COMMON, **tiny_components(TOY_WORDS)))
    return out, res


@pytest.fixture(scope="module")
def stage2(stage1, toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    res = train(TrainConfig(output_dir=str(out), data_path=str(toy),
                            image_folder=str(toy.parent / "images"), stage=2,
                            from_stage1=str(stage1[0]), lora_r=8, lora_alpha=16,
                            learning_rate=5e-3, **COMMON))
    return out, res


def _trained_keys(ckpt):
    return sorted(torch.load(Path(ckpt) / "trainable.pt"))


def test_stage1_trains_the_projector_only(stage1):
    out, res = stage1
    losses = res["losses"]
    assert len(losses) == 4 and res["step"] == 4 and res["samples"] == 32
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(k.startswith("projector.") for k in _trained_keys(res["checkpoint"]))
    assert (out / "projector.pt").is_file() and (out / "projector_config.json").is_file()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in log if "step" in r and "event" not in r]
    assert [r["loss"] for r in steps] == losses
    assert log[0]["gradient_accumulation_steps"] == 2 and log[-1]["event"] == "end"
    assert all(r["samples_per_s"] > 0 and r["visual_tokens_per_s"] > 0 for r in steps)
    assert steps[0]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] < 5e-3


def test_resume_continues_exactly(stage1, toy, tmp_path):
    out, res = stage1
    again = train(TrainConfig(output_dir=str(tmp_path), data_path=str(toy),
                              image_folder=str(toy.parent / "images"), stage=1,
                              learning_rate=1e-2, resume=str(out / "checkpoint-2"), **COMMON))
    assert again["step"] == 4
    assert again["losses"] == res["losses"][2:]


def test_stage2_lora_trains_and_exports_merged(stage2, toy, tmp_path):
    out, res = stage2
    assert res["losses"][-1] < res["losses"][0] - 0.05, res["losses"]
    keys = _trained_keys(res["checkpoint"])
    assert any("lora_A" in k for k in keys) and any(k.startswith("projector.") for k in keys)
    assert not any("lora" not in k and k.startswith("llm.") for k in keys)
    unmerged = load_checkpoint_model(res["checkpoint"]).eval()
    export_merged(res["checkpoint"], tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged = MLLM.from_pretrained(tmp_path / "merged").eval()
    ds = LLaVADataset(toy, toy.parent / "images", merged.tokenizer, merged.image_processor,
                      image_token_id=merged.image_token_id,
                      num_image_tokens=merged.num_visual_tokens)
    b = Collator(merged.tokenizer.pad_token_id)([ds[i] for i in (1, 5, 9)])
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"])
    with torch.no_grad():
        want = unmerged(*args)["logits"]
        got = merged(*args)["logits"]
        text = llm(b["input_ids"][:, -6:]).logits
        text_want = merged.llm(b["input_ids"][:, -6:]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text, text_want, rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(json.load(
        open(Path(res["checkpoint"]) / "run_config.json"))["components"]["llm"])
    with torch.no_grad():
        assert (base(b["input_ids"][:, -6:]).logits - text).abs().max() > 1e-4


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DRIVER = """
import json, sys
from models.mllm.data import TOY_WORDS
from models.mllm import tiny_components
from models.mllm.train import TrainConfig, train
kw = json.loads(sys.argv[1])
comp = tiny_components(TOY_WORDS)
res = train(TrainConfig(**kw, **comp))
"""


def _run(cmd, kw, extra_env=None):
    proc = subprocess.run([*cmd, json.dumps(kw)], env={**_env(), **(extra_env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = [json.loads(line) for line in open(Path(kw["output_dir"]) / "log.jsonl")]
    return [r["loss"] for r in log if "event" not in r]


def test_deepspeed_zero2_matches_plain_run(stage1, toy, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    kw = dict(output_dir=str(tmp_path / "ds"), data_path=str(toy),
              image_folder=str(toy.parent / "images"), stage=1, learning_rate=1e-2,
              deepspeed=str(REPO / "models/mllm/configs/zero2.json"), **COMMON)
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    losses = _run([sys.executable, "-c", _DRIVER], kw, env)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stage1[1]["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert (tmp_path / "ds" / "checkpoint-4" / "deepspeed").is_dir()


def test_torchrun_two_processes_shard_data_and_match_one_process(stage1, toy, tmp_path):
    out1, res1 = stage1
    kw = dict(output_dir=str(tmp_path / "ddp"), data_path=str(toy),
              image_folder=str(toy.parent / "images"), stage=1, learning_rate=1e-2,
              log_sample_ids=True, **{**COMMON, "per_device_batch_size": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(tmp_path / "driver.py")]
    (tmp_path / "driver.py").write_text(_DRIVER)
    losses = _run(cmd, kw)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(res1["losses"]),
                               rtol=1e-5, atol=1e-6)
    read = lambda p: [json.loads(line)["ids"] for line in open(p)]  # noqa: E731
    r0, r1 = read(tmp_path / "ddp" / "samples_rank0.jsonl"), read(tmp_path / "ddp" / "samples_rank1.jsonl")
    single = read(out1 / "samples_rank0.jsonl")
    assert len(r0) == len(r1) == 4
    for a, b, s in zip(r0, r1, single):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == s


def test_cli_from_saved_directories_and_export(stage1, toy, tmp_path, capsys):
    from models.mllm.train import main
    base = stage1[0] / "base"
    main(["--stage", "2", "--llm_mode", "full", "--data_path", str(toy), "--image_folder",
          str(toy.parent / "images"), "--vision_tower", str(base / "vision_tower"),
          "--llm", str(base / "llm"), "--tokenizer", str(base / "tokenizer"),
          "--pretrain_projector", str(stage1[0] / "projector.pt"), "--projector", "mlp2x_gelu",
          "--output_dir", str(tmp_path / "cli"), "--global_batch_size", "4",
          "--per_device_batch_size", "4", "--max_steps", "1", "--no_progress"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 1 and res["missing_images"] == 0
    ck = Path(res["checkpoint"])
    assert (ck / "llm" / "config.json").is_file() and not (ck / "adapter").exists()
    assert any(k.startswith("llm.model.layers.") for k in _trained_keys(ck))
    main(["export", "--checkpoint", str(ck), "--output", str(tmp_path / "exp")])
    from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(ck / "llm")
    exp = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    for (n, a), (_, b) in zip(full.state_dict().items(), exp.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="global_batch_size"):
        train(TrainConfig(data_path=str(toy), global_batch_size=6, per_device_batch_size=4))
    with pytest.raises(ValueError, match="stage"):
        train(TrainConfig(data_path=str(toy), stage=3))
    with pytest.raises(ValueError, match="unknown training options"):
        train({"data_path": str(toy), "lr": 1.0})
