"""LLaVA checkpoints (models/mllm/llava.py) against transformers' own LlavaForConditionalGeneration,
offline, on tiny random checkpoints written with transformers' classes: the llava-hf layout (both
weight-name layouts), the original LLaVA layout (a causal LM + ``model.mm_projector.*`` + a CLIP
tower directory named by path), export to llava-hf, the projector swap, and the trainer's CLI.

Vision and LLM widths are equal (32), so a swapped or transposed projector matrix keeps its
shape and only the numbers can catch it; the weights are random at unit scale (every layer
matters to the logits)."""
import json
import math
import shutil
import string
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import transformers as tf  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from models.mllm import MLLM, word_level_tokenizer  # noqa: E402
from models.mllm.conversation import TEMPLATES  # noqa: E402
from models.mllm.data import TOY_WORDS, write_toy_dataset  # noqa: E402
from models.mllm.llava import chat_template_jinja, is_llava_checkpoint  # noqa: E402

SIDE, PATCH, WIDTH = 28, 4, 32
GRID = (SIDE // PATCH) ** 2  # 49 patches
WORDS = [*TOY_WORDS, "USER", "ASSISTANT"]
QUESTIONS = ["What color is the square ?", "describe the image in one word"]  # 6 words each


def perturb_(module):
    """Random weights at unit scale: matrices N(0, 1 / fan_in), norm gains N(1, 0.1), biases
    and 1-D embeddings N(0, 0.1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return module


def vision_config(kind="clip", layers=3):
    cls = tf.CLIPVisionConfig if kind == "clip" else tf.SiglipVisionConfig
    return cls(image_size=SIDE, patch_size=PATCH, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
               num_hidden_layers=layers, num_attention_heads=2)


def llama_config(tok, vocab=None):
    return tf.LlamaConfig(vocab_size=vocab or len(tok), hidden_size=WIDTH,
                          intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, tie_word_embeddings=False)


def clip_processor():
    return tf.CLIPImageProcessor(size={"shortest_edge": SIDE},
                                 crop_size={"height": SIDE, "width": SIDE})


def images(n=2):
    """Non-square images with random pixels (pad and crop differ on them)."""
    return [Image.fromarray(torch.randint(0, 256, (20 + 5 * i, 33, 3), dtype=torch.uint8).numpy())
            for i in range(n)]


def rename_to_module_layout(d: Path) -> None:
    """Rewrite a llava-hf ``model.safetensors`` (transformers 5.x saves the legacy key names
    ``language_model.model.*`` / ``vision_tower.*`` / ...) with the module names of
    transformers 4.52+ (``model.language_model.*``, ``lm_head``, ``model.vision_tower.*``)."""
    sd = load_file(d / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            out["model.language_model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out[k[len("language_model."):]] = v
        else:
            out["model." + k] = v
    save_file(out, d / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------ llava-hf dirs
HF_CASES = {
    # LLaVA-1.5-hf: CLS dropped, layer -2, legacy key names
    "default": dict(tower="clip", layer=-2, strategy="default", bias=True, act="gelu",
                    layout="legacy"),
    # every token kept (CLS first), two layers concatenated, no projector bias, 4.52+ names
    "full-multilayer": dict(tower="clip", layer=[-3, -1], strategy="full", bias=False,
                            act="gelu_pytorch_tanh", layout="modules"),
    # a SigLIP tower (no CLS: "full" = the patches), as llava-interleave
    "siglip": dict(tower="siglip", layer=-1, strategy="full", bias=True, act="gelu",
                   layout="legacy"),
}


def write_hf(d: Path, case: dict) -> Path:
    tok = word_level_tokenizer(WORDS)
    image_id = tok.convert_tokens_to_ids("<image>")
    n_tokens = GRID + (case["strategy"] == "full" and case["tower"] == "clip")
    cfg = tf.LlavaConfig(vision_config=vision_config(case["tower"]).to_dict(),
                         text_config=llama_config(tok).to_dict(), image_token_index=image_id,
                         image_seq_length=n_tokens, vision_feature_layer=case["layer"],
                         vision_feature_select_strategy=case["strategy"],
                         multimodal_projector_bias=case["bias"],
                         projector_hidden_act=case["act"])
    model = perturb_(tf.LlavaForConditionalGeneration(cfg))
    model.save_pretrained(d)
    if case["layout"] == "modules":
        rename_to_module_layout(d)
    proc = (clip_processor() if case["tower"] == "clip" else
            tf.SiglipImageProcessor(size={"height": SIDE, "width": SIDE}))
    tf.LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=PATCH,
                      vision_feature_select_strategy=case["strategy"],
                      num_additional_image_tokens=int(case["tower"] == "clip")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_hf")
    return {name: write_hf(root / name, case) for name, case in HF_CASES.items()}


def hf_inputs(processor, ims=None):
    ims = ims or images(2)
    text = [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS]
    return processor(images=ims, text=text, return_tensors="pt")


@pytest.mark.parametrize("name", list(HF_CASES))
def test_from_llava_hf_logits_equal_transformers(hf_dirs, name):
    d = hf_dirs[name]
    ref = tf.LlavaForConditionalGeneration.from_pretrained(d).eval()
    inputs = hf_inputs(tf.AutoProcessor.from_pretrained(d))
    n_img = int((inputs["input_ids"] == ref.config.image_token_id).sum())
    model = MLLM.from_llava(d).eval()
    assert n_img == 2 * model.num_visual_tokens
    assert model.image_token_id == ref.config.image_token_id
    with torch.no_grad():
        want = ref(**inputs).logits
        got = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])["logits"]
    assert got.shape == want.shape and want.std() > 0.3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the parts are transformers' modules, their weights as loaded
    ref_sd = ref.state_dict()
    for n, p in model.vision_tower.state_dict().items():
        assert torch.equal(p, ref_sd["model.vision_tower." + n]), n
    assert torch.equal(model.llm.lm_head.weight, ref_sd["lm_head.weight"])


def test_hf_default_strategy_on_a_tower_without_cls_is_refused(tmp_path):
    d = write_hf(tmp_path / "bad", {**HF_CASES["siglip"], "strategy": "default"})
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        MLLM.from_llava(d)


# ------------------------------------------------------------------------ original LLaVA dirs
def original_tokenizer():
    """A word-level tokenizer like Vicuna's for these tests: no ``<image>`` entry."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    vocab = {}
    for w in ["<unk>", "<s>", "</s>", *word_level_tokenizer(WORDS).get_vocab()]:
        if w not in ("<image>", "<pad>"):
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>")


ORIG_CASES = {
    # LLaVA-1.5 as released: model_type "llava", mlp2x_gelu, pad; a non-default layer
    "llava15-pad": dict(model_type="llava", ptype="mlp2x_gelu", select="patch", layer=-3,
                        aspect="pad", im_patch=False),
    # CLS kept, no padding, <im_patch> added by the loader before <image>
    "cls-patch": dict(model_type="llava_llama", ptype="mlp2x_gelu", select="cls_patch",
                      layer=-1, aspect="square", im_patch=True),
}


def write_original(d: Path, case: dict, tok=None) -> dict:
    """An original-layout LLaVA directory and the in-memory parts it was written from
    (``tok``: its tokenizer, default :func:`original_tokenizer`)."""
    tok = original_tokenizer() if tok is None else tok
    llm = perturb_(tf.LlamaForCausalLM(llama_config(tok)))
    clip = perturb_(tf.CLIPVisionModel(vision_config("clip")))
    clip.save_pretrained(d / "clip")
    clip_processor().save_pretrained(d / "clip")
    proj = {f"model.mm_projector.{i}.{w}": torch.randn(WIDTH, WIDTH) * WIDTH ** -0.5
            if w == "weight" else torch.randn(WIDTH) * 0.1 for i in (0, 2)
            for w in ("weight", "bias")}
    m = d / "llava"
    llm.save_pretrained(m)
    tok.save_pretrained(m)
    sd = load_file(m / "model.safetensors")
    save_file({**sd, **proj}, m / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type=case["model_type"], architectures=["LlavaLlamaForCausalLM"],
               mm_vision_tower=str(d / "clip"), mm_projector_type=case["ptype"],
               mm_vision_select_layer=case["layer"], mm_vision_select_feature=case["select"],
               mm_hidden_size=WIDTH, image_aspect_ratio=case["aspect"],
               mm_use_im_start_end=False, mm_use_im_patch_token=case["im_patch"],
               mm_patch_merge_type="flat", tune_mm_mlp_adapter=False, use_mm_proj=True,
               tokenizer_model_max_length=2048, tokenizer_padding_side="right",
               # the rest of the released llava-v1.5-7b config.json (transformers 4.31 era)
               freeze_mm_mlp_adapter=False, tune_mm_vision_resampler=False,
               unfreeze_mm_vision_tower=False, max_length=4096, pretraining_tp=1,
               rope_scaling=None, transformers_version="4.31.0",
               _name_or_path="llava-v1.5-7b")
    (m / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"dir": m, "tok": tok, "llm": llm, "clip": clip, "proj": proj, "case": case}


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_orig")
    return {name: write_original(root / name, case) for name, case in ORIG_CASES.items()}


def reference_from_original(src: dict):
    """The llava-hf model and processor equivalent to an original-layout checkpoint, converted
    here from the objects it was written from: ``<im_patch>`` (if used) then ``<image>`` added
    to the tokenizer, their embedding and head rows the mean of the old rows (the loader's
    documented choice; LLaVA's never reads the image rows), mm_projector.0 / .2 as linear_1 /
    linear_2, the processor padding to a square with the CLIP mean colour."""
    case, tok = src["case"], original_tokenizer()
    if case["im_patch"]:
        tok.add_tokens(["<im_patch>"], special_tokens=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.pad_token = tok.unk_token
    image_id = tok.convert_tokens_to_ids("<image>")
    full = case["select"] == "cls_patch"
    cfg = tf.LlavaConfig(vision_config=vision_config("clip").to_dict(),
                         text_config=llama_config(tok, vocab=len(tok)).to_dict(),
                         image_token_index=image_id, vision_feature_layer=case["layer"],
                         vision_feature_select_strategy="full" if full else "default")
    ref = tf.LlavaForConditionalGeneration(cfg).eval()
    sd = {}
    for k, v in src["llm"].state_dict().items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = torch.cat([v, v.mean(0, keepdim=True).expand(len(tok) - v.shape[0], -1)])
        sd[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v
    sd.update({"model.vision_tower." + k: v for k, v in src["clip"].state_dict().items()})
    for i, j in ((0, 1), (2, 2)):
        for w in ("weight", "bias"):
            sd[f"model.multi_modal_projector.linear_{j}.{w}"] = src["proj"][
                f"model.mm_projector.{i}.{w}"]
    ref.load_state_dict(sd, strict=True)
    ip = clip_processor()
    if case["aspect"] == "pad":
        ip = tf.LlavaImageProcessor(**{k: getattr(ip, k) for k in (
            "size", "crop_size", "image_mean", "image_std", "resample")}, do_pad=True)
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                             num_additional_image_tokens=1)
    return ref, proc


def llava_process_images(ims, aspect):
    """LLaVA's ``process_images`` (mm_utils.py) rebuilt: ``pad`` = expand2square with the CLIP
    mean colour as ints, centred, then the CLIP processor."""
    ip = clip_processor()
    out = []
    for im in ims:
        if aspect == "pad":
            w, h = im.size
            side = max(w, h)
            sq = Image.new(im.mode, (side, side), tuple(int(x * 255) for x in ip.image_mean))
            sq.paste(im, ((side - w) // 2, (side - h) // 2))
            im = sq
        out.append(ip(images=im, return_tensors="pt")["pixel_values"][0])
    return torch.stack(out)


@pytest.mark.parametrize("name", list(ORIG_CASES))
def test_from_llava_original_logits_equal_converted_transformers(orig, name):
    src = orig[name]
    ref, proc = reference_from_original(src)
    ims = images(2)
    inputs = hf_inputs(proc, ims)
    want_pix = llava_process_images(ims, src["case"]["aspect"])
    assert torch.equal(inputs["pixel_values"], want_pix)  # the reference processor is LLaVA's
    model = MLLM.from_llava(src["dir"]).eval()
    assert model.image_token_id == ref.config.image_token_id
    assert torch.equal(model.preprocess_images(ims), want_pix)  # pad honoured (or not) as LLaVA
    with torch.no_grad():
        want = ref(**inputs).logits
        got = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])["logits"]
    assert got.shape == want.shape and want.std() > 0.3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the model's own prompts carry the same ids as the processor's text
    ids, _ = model.prompt_ids(QUESTIONS[:1], template="plain")
    assert ids[0].tolist() == [model.tokenizer.bos_token_id] + [model.image_token_id] * \
        model.num_visual_tokens


@pytest.mark.parametrize("ptype,depth", [("linear", 1), ("mlp3x_gelu", 3), ("identity", 0)])
def test_original_projector_types_match_llavas_builder(tmp_path, ptype, depth):
    """LLaVA's ``build_vision_projector`` rebuilt (nn.Linear / nn.Sequential(Linear, GELU, ...)
    / identity) and loaded with the checkpoint's ``mm_projector`` tensors gives the loaded
    projector's output."""
    src = write_original(tmp_path, dict(model_type="llava_llama", ptype="mlp2x_gelu",
                                        select="patch", layer=-2, aspect="pad", im_patch=False))
    m = src["dir"]
    sd = load_file(m / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("model.mm_projector.")}
    layers = [torch.nn.Linear(WIDTH, WIDTH)] if depth else []
    for _ in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH)]
    perturb_(llava := (layers[0] if depth == 1 else torch.nn.Sequential(*layers)))
    sd.update({"model.mm_projector." + k: v for k, v in llava.state_dict().items()})
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": ptype}))
    model = MLLM.from_llava(m)
    x = torch.randn(2, GRID, WIDTH)
    torch.testing.assert_close(model.projector(x), llava(x), rtol=0, atol=0)
    assert model.projector.config["name"] == ("linear" if ptype == "linear" else "mlp")


def test_original_tower_weights_from_the_shards_when_it_was_trained(orig, tmp_path):
    """``unfreeze_mm_vision_tower``: the tower weights of the shards
    (``model.vision_tower.vision_tower.vision_model.*``, transformers 4.x names) are used, as
    LLaVA's loader does; without it, the ``mm_vision_tower`` weights."""
    src = orig["llava15-pad"]
    m = tmp_path / "m"
    shutil.copytree(src["dir"], m)
    trained = perturb_(tf.CLIPVisionModel(vision_config("clip")))
    sd = load_file(m / "model.safetensors")
    sd.update({"model.vision_tower.vision_tower.vision_model." + k: v
               for k, v in trained.state_dict().items()})
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    assert all(torch.equal(a, b) for a, b in zip(
        MLLM.from_llava(m).vision_tower.state_dict().values(), src["clip"].state_dict().values()))
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "unfreeze_mm_vision_tower": True}))
    got = MLLM.from_llava(m).vision_tower.state_dict()
    for k, v in trained.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("edit,match", [
    ({"mm_projector_type": "resampler"}, "mm_projector_type"),
    ({"mm_vision_tower": "/nonexistent/clip-vit"}, "mm_vision_tower"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"image_aspect_ratio": "anyres"}, "anyres"),
    ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size"),
    ({"model_type": "llava_next"}, "LLaVA-NeXT"),
    ({"model_type": "llava_mpt"}, "model_type"),
])
def test_original_errors_name_the_field(orig, tmp_path, edit, match):
    m = tmp_path / "m"
    m.mkdir()
    for f in src_files(orig["llava15-pad"]["dir"]):
        (m / f.name).symlink_to(f)
    cfg = json.loads((orig["llava15-pad"]["dir"] / "config.json").read_text())
    (m / "config.json").unlink()
    (m / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=match):
        MLLM.from_llava(m)


def src_files(d):
    return [f for f in Path(d).iterdir() if f.is_file()]


def test_not_a_llava_checkpoint(orig, tmp_path):
    assert is_llava_checkpoint(orig["llava15-pad"]["dir"])
    assert not is_llava_checkpoint(orig["llava15-pad"]["dir"].parent / "clip")
    with pytest.raises(ValueError, match="not a LLaVA checkpoint"):
        MLLM.from_llava(orig["llava15-pad"]["dir"].parent / "clip")
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"mm_vision_tower": "x"}))
    with pytest.raises(ValueError, match="LoRA"):
        MLLM.from_llava(tmp_path)


# ------------------------------------------------------------------------- export and swap
def test_chat_templates_render_the_conversation_templates():
    """Each exported Jinja template renders a conversation as conversation.py's template does
    (text level, eos as </s>), images first, a leading system message replacing the prompt."""
    from jinja2 import Environment
    turns = ["<image>\nWhat is it ?", "A cat .", "And the colour ?", "Red ."]
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What is it ?"}]},
            {"role": "assistant", "content": "A cat ."},
            {"role": "user", "content": [{"type": "text", "text": "And the colour ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red ."}]}]
    env = Environment()
    n = 0
    for name, tmpl in TEMPLATES.items():
        if tmpl is None:
            continue
        jt = env.from_string(chat_template_jinja(name, add_bos=True))
        for k in (1, 3, 4):
            got = jt.render(messages=msgs[:k], bos_token="<s>", eos_token="</s>")
            want = ("<s>" if tmpl.bos else "") + tmpl.render(turns[:k])
            assert got == want, (name, k)
        sys_got = jt.render(messages=[{"role": "system", "content": "Be brief ."}, msgs[0]],
                            bos_token="", eos_token="</s>")
        assert tmpl.system == "" or ("Be brief ." in sys_got and tmpl.system not in sys_got)
        n += 1
    assert n == 5 and chat_template_jinja("plain") is None


def _exported(model, d):
    model.save_llava(d)
    return (tf.LlavaForConditionalGeneration.from_pretrained(d).eval(),
            tf.AutoProcessor.from_pretrained(d))


@pytest.mark.parametrize("source", ["orig:llava15-pad", "orig:cls-patch", "hf:full-multilayer",
                                    "hf:siglip"])
def test_export_loads_in_transformers_same_logits_and_greedy_tokens(orig, hf_dirs, tmp_path,
                                                                    source):
    kind, name = source.split(":")
    model = MLLM.from_llava(orig[name]["dir"] if kind == "orig" else hf_dirs[name]).eval()
    hf, proc = _exported(model, tmp_path / "export")
    assert hf.config.image_token_id == model.image_token_id
    assert proc.image_token_id == model.image_token_id
    ims = images(2)
    # the chat template + processor give the model's own prompt ids (vicuna_v1)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
            for q in QUESTIONS]
    text = [proc.apply_chat_template([c], add_generation_prompt=True) for c in conv]
    inputs = proc(images=ims, text=text, return_tensors="pt")
    ids, mask = model.prompt_ids(QUESTIONS)
    assert inputs["input_ids"].tolist() == ids.tolist()
    assert torch.equal(inputs["pixel_values"], model.preprocess_images(ims))
    with torch.no_grad():
        want = model(ids, mask, inputs["pixel_values"])["logits"]
        got = hf(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        ours = model.generate(ids, mask, inputs["pixel_values"], **gen)
        theirs = hf.generate(**inputs, **gen)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs), (ours, theirs)
    back = MLLM.from_llava(tmp_path / "export").eval()  # and back
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, inputs["pixel_values"])["logits"], want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["hf:default", "orig:llava15-pad"])
def test_projector_swap_keeps_tower_and_llm_weights(orig, hf_dirs, tmp_path, source):
    kind, name = source.split(":")
    d = orig[name]["dir"] if kind == "orig" else hf_dirs[name]
    kept = MLLM.from_llava(d)
    swapped = MLLM.from_llava(d, projector="deco", projector_kwargs={"query_num": 16})
    assert swapped.projector.config["name"] == "deco" and swapped.num_visual_tokens == 16
    assert swapped.vision_feature_layer == kept.vision_feature_layer
    assert swapped.image_token_id == kept.image_token_id
    for part in ("vision_tower", "llm"):
        a, b = getattr(kept, part).state_dict(), getattr(swapped, part).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    if kind == "orig":  # and they are the checkpoint's (embeddings: + the <image> row)
        src = orig[name]
        for k, v in src["llm"].state_dict().items():
            got = swapped.llm.state_dict()[k]
            assert torch.equal(got[:v.shape[0]], v), k
        for k, v in src["clip"].state_dict().items():
            assert torch.equal(swapped.vision_tower.state_dict()[k], v), k
    ims = images(1)
    ids, mask = swapped.prompt_ids(QUESTIONS[:1])
    assert int((ids == swapped.image_token_id).sum()) == 16
    with pytest.raises(ValueError, match="mlp2x_gelu.*save_pretrained"):
        swapped.save_llava(tmp_path / "x")
    swapped.save_pretrained(tmp_path / "mllm")  # what to use instead
    again = MLLM.from_pretrained(tmp_path / "mllm").eval()
    pix = swapped.preprocess_images(ims)
    assert torch.equal(again.preprocess_images(ims), pix)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, pix)["logits"],
                                   swapped.eval()(ids, mask, pix)["logits"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        MLLM.from_llava(d, vision_feature_layer=-1 if kept.vision_feature_layer != -1 else -2)


# --------------------------------------------------------------------------------- trainer
def test_cli_lora_finetune_of_llava_hf_merges_and_exports(hf_dirs, tmp_path, capsys):
    from models.mllm.train import export_merged, load_checkpoint_model, main
    d = hf_dirs["default"]
    data = write_toy_dataset(tmp_path / "toy", 8, seed=0)
    out = tmp_path / "run"
    main(["--model_name_or_path", str(d), "--data_path", str(data),
          "--image_folder", str(data.parent / "images"), "--output_dir", str(out),
          "--lora_enable", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-3",
          "--per_device_train_batch_size", "4", "--max_steps", "2", "--warmup_ratio", "0",
          "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
          "--save_llava", str(out / "llava-hf")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 2 and all(math.isfinite(x) for x in res["losses"])
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out / "llava-hf").eval()
    proc = tf.AutoProcessor.from_pretrained(out / "llava-hf")
    merged = load_checkpoint_model(out)
    merged.merge_lora()
    merged.eval()
    ims = images(2)
    inputs = hf_inputs(proc, ims)
    # trained with --image_aspect_ratio pad (the default): the export's processor pads, as LLaVA
    assert torch.equal(inputs["pixel_values"], llava_process_images(ims, "pad"))
    with torch.no_grad():
        want = merged(inputs["input_ids"], inputs["attention_mask"],
                      inputs["pixel_values"])["logits"]
        torch.testing.assert_close(hf(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        base = tf.LlavaForConditionalGeneration.from_pretrained(d).eval()(**inputs).logits
    assert (base - want).abs().max() > 1e-3  # the fine-tune changed the model
    base_sd = tf.LlavaForConditionalGeneration.from_pretrained(d).state_dict()
    for k, v in hf.state_dict().items():  # the tower is the checkpoint's, bit for bit
        if k.startswith("model.vision_tower."):
            assert torch.equal(v, base_sd[k]), k
    export_merged(out, tmp_path / "again", fmt="llava")
    again = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_trainer_builds_from_a_llava_checkpoint(orig, tmp_path):
    from models.mllm.train import build_model, check_save_llava, parse_args
    src = orig["llava15-pad"]
    data = write_toy_dataset(tmp_path / "toy", 2, seed=0)
    kw = dict(model_name_or_path=str(src["dir"]), data_path=str(data), output_dir=str(tmp_path),
              use_cpu=True)
    model = build_model(*parse_args({**kw, "stage": 2})[::2])  # no --vision_tower needed
    assert model.projector.config["name"] == "mlp2x_gelu" and model.vision_feature_layer == -3
    for k, v in src["proj"].items():
        i, w = k.split(".")[-2:]
        assert torch.equal(model.projector.mlp[int(i)].state_dict()[w], v), k
    swap = build_model(*parse_args({**kw, "stage": 1, "projector": "pargo", "projector_kwargs":
                                    {"n_partial": 12, "n_global": 4, "n_layers": 1, "hidden": 32,
                                     "heads": 2, "intermediate": 32, "impl": "reference"}})[::2])
    assert swap.projector.config["name"] == "pargo" and swap.num_visual_tokens == 16
    assert all(p.requires_grad == n.startswith("projector.") for n, p in swap.named_parameters())
    with pytest.raises(ValueError, match="deco.*llava-hf"):
        build_model(*parse_args({**kw, "stage": 1, "projector": "deco",
                                 "save_llava": str(tmp_path / "x")})[::2])
    with pytest.raises(ValueError, match="ZeRO-3.*export"):
        check_save_llava(str(tmp_path / "x"), {"zero_optimization": {"stage": 3}})
    check_save_llava(str(tmp_path / "x"), {"zero_optimization": {"stage": 2}})



# ----------------------------------------------------------------- image policies (review fixes)
def _policy_dataset(model, folder, **kw):
    from models.mllm.data import LLaVADataset
    return LLaVADataset(folder / "d.json", folder, model.tokenizer, model.image_processor,
                        image_token_id=model.image_token_id,
                        num_image_tokens=model.num_visual_tokens, **kw)


@pytest.mark.parametrize("source", ["orig:llava15-pad", "hf:padding-processor"])
def test_image_policies_do_what_they_say_on_a_padded_checkpoint(orig, hf_dirs, tmp_path, source):
    """A checkpoint that pads (original layout ``image_aspect_ratio: "pad"``; a llava-hf one
    whose processor is a ``LlavaImageProcessor(do_pad=True)``): the dataset's ``pad`` pads,
    ``crop`` crops and ``native`` keeps the image's own size (nobody pads behind their
    back); ``preprocess_images`` (chat, MME) and an export's processor follow the model's
    ``image_aspect_ratio``."""
    from models.mllm.data import native_size
    from models.mllm.llava import padding_processor
    kind, _ = source.split(":")
    if kind == "orig":
        model = MLLM.from_llava(orig["llava15-pad"]["dir"]).eval()
    else:
        model = MLLM.from_llava(hf_dirs["default"]).eval()
        model.image_processor = padding_processor(model.image_processor, True)
        assert model.image_aspect_ratio == "crop"  # its own processor did not pad
        model.image_aspect_ratio = "pad"
    if kind == "orig":
        assert model.image_aspect_ratio == "pad"
    im = images(1)[0]  # 33 x 20
    im.save(tmp_path / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat color is the square ?"},
            {"from": "gpt", "value": "red"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": 0, "image": "a.png",
                                                   "conversations": conv}]))
    pad, crop = llava_process_images([im], "pad")[0], llava_process_images([im], "crop")[0]
    assert (pad - crop).abs().max() > 0.5
    got = {a: _policy_dataset(model, tmp_path, image_aspect_ratio=a)[0]["pixel_values"][0]
           for a in ("pad", "crop")}
    assert torch.equal(got["pad"], pad) and torch.equal(got["crop"], crop)
    nat = _policy_dataset(model, tmp_path, image_resize="native", max_pixels=SIDE * SIDE,
                          patch_size=PATCH, tokens_for_grid=lambda g: g[0] * g[1])[0]
    w, h = native_size(*im.size, SIDE * SIDE, PATCH)
    assert (w, h) == (32, 20) and nat["visual_grids"] == [(h // PATCH, w // PATCH)]
    want = clip_processor()(images=im.resize((w, h), Image.BICUBIC), do_resize=False,
                            do_center_crop=False, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(nat["pixel_values"][0], want)
    for aspect, want_pix in (("pad", pad), ("crop", crop)):
        model.image_aspect_ratio = aspect
        assert torch.equal(model.preprocess_images([im])[0], want_pix)
        model.save_llava(tmp_path / aspect)
        proc = tf.AutoProcessor.from_pretrained(tmp_path / aspect)
        assert torch.equal(proc.image_processor(images=im, return_tensors="pt")[
            "pixel_values"][0], want_pix), aspect
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        model.image_aspect_ratio = "square"


def sentencepiece_llama_tokenizer(legacy: bool):
    """A Llama tokenizer as Llama-2 / Vicuna ship (transformers' own ``LlamaTokenizer``: BPE
    with byte fallback, a Metaspace pre-tokenizer, BOS added by the tokenizer), built offline
    on a character vocabulary; ``legacy`` as the checkpoints' ``legacy`` flag (True: a '▁'
    after special tokens too)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for ch in "▁" + string.ascii_letters + string.digits + ".,:?!'":
        vocab.setdefault(ch, len(vocab))
    tok = tf.LlamaTokenizer(vocab=vocab, merges=[], legacy=legacy, add_bos_token=True)
    assert tok("a b")["input_ids"] == [1, vocab["▁"], vocab["a"], vocab["▁"], vocab["b"]]
    assert tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"]) == \
        ["▁", "<0x0A>"]
    return tok


def byte_level_tokenizer():
    """A byte-level BPE tokenizer as Llama-3 / Qwen ship (GPT-2 bytes, no prefix space, BOS
    added by its post-processor), built offline on the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, processors
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(tmodels.BPE(vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    assert tok("a b")["input_ids"] == [0, vocab["a"], vocab["Ġ"], vocab["b"]]
    return tok


def llava_tokenizer_image_token(tok, prompt, image_id, n_tokens):
    """LLaVA's ``tokenizer_image_token`` (mm_utils.py) rebuilt: the prompt split at each
    ``<image>``, every chunk tokenised alone with BOS, the BOS of the later chunks dropped,
    ``n_tokens`` image ids between chunks (LLaVA puts one -200 there, expanded by its model)."""
    chunks = [tok(c)["input_ids"] for c in prompt.split("<image>")]
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [image_id] * n_tokens + c[1:]
    return ids


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-legacy", "byte-level"])
def test_sentencepiece_prompts_match_llava_and_the_export(tmp_path, kind):
    """On real-style tokenizers (Llama-2 / Vicuna SentencePiece, non-legacy and legacy;
    Llama-3 / Qwen byte-level BPE): the model's prompts carry LLaVA's own
    ``tokenizer_image_token`` ids (SentencePiece: a '▁' starts the text after each image),
    and the exported processor + chat template give those same ids (BOS from the tokenizer,
    once)."""
    tok = (byte_level_tokenizer() if kind == "byte-level"
           else sentencepiece_llama_tokenizer(kind.endswith("legacy")))
    src = write_original(tmp_path, ORIG_CASES["llava15-pad"], tok=tok)
    model = MLLM.from_llava(src["dir"]).eval()
    q = "What is it?"
    ids, mask = model.prompt_ids([q])
    prompt = TEMPLATES["vicuna_v1"].render([f"<image>\n{q}"])
    want = llava_tokenizer_image_token(model.tokenizer, prompt, model.image_token_id,
                                       model.num_visual_tokens)
    assert ids[0].tolist() == want
    after = want[want.index(model.image_token_id) + model.num_visual_tokens:][:2]
    assert model.tokenizer.convert_ids_to_tokens(after) == (
        ["Ċ", "W"] if kind == "byte-level" else ["▁", "<0x0A>"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf, proc = _exported(model, tmp_path / "export")
    assert not [w for w in caught if "other token ids than training" in str(w.message)]
    assert "bos_token" not in proc.chat_template  # the tokenizer adds BOS itself
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    inputs = proc(images=images(1), text=[text], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == want
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits,
                                   model(ids, mask, inputs["pixel_values"])["logits"],
                                   rtol=1e-5, atol=1e-5)


def test_new_projector_on_another_tower_ignores_the_checkpoints_projector_width(orig, tmp_path):
    """``vision_tower=`` of another width with ``projector=``: the checkpoint's projector (and
    its ``mm_hidden_size``) is not used, so it is not checked; keeping it is refused."""
    src = orig["llava15-pad"]
    wide = perturb_(tf.CLIPVisionModel(tf.CLIPVisionConfig(
        image_size=SIDE, patch_size=PATCH, hidden_size=48, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=2)))
    wide.save_pretrained(tmp_path / "clip48")
    clip_processor().save_pretrained(tmp_path / "clip48")
    model = MLLM.from_llava(src["dir"], vision_tower=str(tmp_path / "clip48"),
                            projector="deco", projector_kwargs={"query_num": 16})
    assert model.projector.config["vision_width"] == 48
    for k, v in wide.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[k], v), k
    with pytest.raises(ValueError, match="mm_hidden_size"):
        MLLM.from_llava(src["dir"], vision_tower=str(tmp_path / "clip48"))


def test_trained_tower_and_image_policy_reach_the_exports(orig, tmp_path):
    """A run with ``--unfreeze_mm_vision_tower --image_aspect_ratio crop`` on a checkpoint that
    pads: both exports hold the trained tower, and the crop policy is in the model config
    (``load_checkpoint_model``, ``MLLM.from_pretrained``: ``preprocess_images`` crops) and in
    the llava-hf processor."""
    from models.mllm.train import export_merged, load_checkpoint_model, train
    src = orig["llava15-pad"]
    data = write_toy_dataset(tmp_path / "toy", 4, seed=0)
    model = MLLM.from_llava(src["dir"])
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    out = tmp_path / "run"
    train({"model_name_or_path": str(src["dir"]), "data_path": str(data),
           "image_folder": str(data.parent / "images"), "output_dir": str(out), "stage": 1,
           "unfreeze_mm_vision_tower": True, "image_aspect_ratio": "crop",
           "per_device_train_batch_size": 4, "max_steps": 2, "warmup_ratio": 0, "use_cpu": True,
           "disable_tqdm": True, "save_strategy": "no"}, model=model)
    trained = model.vision_tower.state_dict()
    assert max((trained[k] - v).abs().max() for k, v in before.items()) > 1e-4
    ims = images(1)
    crop = llava_process_images(ims, "crop")
    back = load_checkpoint_model(out)
    assert back.image_aspect_ratio == "crop" and torch.equal(back.preprocess_images(ims), crop)
    for k, v in trained.items():
        assert torch.equal(back.vision_tower.state_dict()[k], v), k
    export_merged(out, tmp_path / "mllm")
    again = MLLM.from_pretrained(tmp_path / "mllm")
    assert again.image_aspect_ratio == "crop" and torch.equal(again.preprocess_images(ims), crop)
    export_merged(out, tmp_path / "hf", fmt="llava", template="vicuna_v1")
    hf = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    for k, v in trained.items():
        assert torch.equal(hf["model.vision_tower." + k], v), k
    proc = tf.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert torch.equal(proc.image_processor(images=ims, return_tensors="pt")["pixel_values"],
                       crop)
