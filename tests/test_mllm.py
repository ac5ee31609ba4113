"""MLLM, conversation templates and LLaVA data on CPU with tiny models built in code."""
import json
import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from models.mllm.conversation import IGNORE_INDEX, tokenize_conversation  # noqa: E402
from models.mllm.data import TOY_WORDS, Collator, LLaVADataset, write_toy_dataset  # noqa: E402
from models.mllm import MLLM, tiny_components  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), 6, seed=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLLM.build(**tiny_components(TOY_WORDS), projector="mlp2x_gelu").eval()


def _dataset(model, toy, **kw):
    return LLaVADataset(toy, toy.parent / "images", model.tokenizer, model.image_processor,
                        image_token_id=model.image_token_id,
                        num_image_tokens=model.num_visual_tokens, **kw)


def test_labels_cover_only_the_answers(model):
    tok = model.tokenizer
    conv = [{"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": "the square is red"},
            {"from": "human", "value": "Is it blue?"}, {"from": "gpt", "value": "No"}]
    enc = tokenize_conversation(tok, conv, image_token_id=model.image_token_id,
                                num_image_tokens=5)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
    assert ids.count(model.image_token_id) == 5
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert tok.convert_ids_to_tokens(trained) == ["the", "square", "is", "red", "</s>", "No",
                                                  "</s>"]
    prompt = tokenize_conversation(tok, conv[:3], image_token_id=model.image_token_id,
                                   num_image_tokens=5, for_generation=True)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt[-2:]) == ["ASSISTANT", ":"]
    assert prompt == ids[:len(prompt)]
    with pytest.raises(ValueError, match="alternate"):
        tokenize_conversation(tok, [conv[1]], image_token_id=1, num_image_tokens=1)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(tok, conv, image_token_id=model.image_token_id,
                              num_image_tokens=5, max_length=35)


def test_encode_images_drops_cls_and_uses_the_chosen_layer(model):
    pix = torch.randn(3, 3, 28, 28)
    hs = model.vision_tower(pixel_values=pix, output_hidden_states=True).hidden_states
    assert hs[-2].shape[1] == 7 * 7 + 1
    want = model.projector(hs[-2][:, 1:])
    torch.testing.assert_close(model.encode_images(pix), want, rtol=0, atol=0)
    assert model.num_visual_tokens == 49
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


def test_left_and_right_padding_give_the_same_loss(model, toy):
    ds = _dataset(model, toy)
    items = [ds[0], ds[3], ds[4]]
    assert len({len(it["input_ids"]) for it in items}) > 1
    right = Collator(model.tokenizer.pad_token_id, "right")(items)
    left = Collator(model.tokenizer.pad_token_id, "left")(items)
    with torch.no_grad():
        o_r = model(right["input_ids"], right["attention_mask"], right["pixel_values"],
                    right["labels"])
        o_l = model(left["input_ids"], left["attention_mask"], left["pixel_values"],
                    left["labels"])
    assert torch.isfinite(o_r["loss"]) and o_r["num_tokens"] == o_l["num_tokens"]
    torch.testing.assert_close(o_l["loss"], o_r["loss"], rtol=1e-5, atol=1e-6)
    for b in range(3):
        real_r = o_r["logits"][b][right["attention_mask"][b].bool()]
        real_l = o_l["logits"][b][left["attention_mask"][b].bool()]
        torch.testing.assert_close(real_l, real_r, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise(model):
    ids = torch.full((1, 10), model.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="vision_feature_layer"):
        MLLM(model.vision_tower, model.projector, model.llm, model.image_token_id,
             vision_feature_layer=5)
    with pytest.raises(ValueError, match="visual_grid"):
        from models import build_projector
        MLLM(model.vision_tower, build_projector("linear", vision_width=32, llm_width=64,
                                                 visual_grid=(6, 6)),
             model.llm, model.image_token_id)
    with pytest.raises(TypeError, match="projector"):
        MLLM.build(**tiny_components(TOY_WORDS), projector=3)


def test_linear_projector_and_batched_generation(toy):
    torch.manual_seed(1)
    m = MLLM.build(**tiny_components(TOY_WORDS), projector="linear").eval()
    assert m.projector.config["name"] == "linear"
    from PIL import Image
    images = [Image.open(toy.parent / "images" / f"{i}.png") for i in range(3)]
    qs = ["What color is the square?", "describe the image", "Is there a red square?"]
    batched = m.chat(images, qs, max_new_tokens=4)
    single = [m.chat([im], [q], max_new_tokens=4)[0] for im, q in zip(images, qs)]
    assert batched == single and all(isinstance(s, str) for s in batched)
    with pytest.raises(ValueError, match="same length"):
        m.chat(images, qs[:2])


def test_lora_adapter_save_load_round_trip(model, toy, tmp_path):
    base = copy.deepcopy(model)
    lora = copy.deepcopy(model)
    lora.apply_lora(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(3)
    for n, p in lora.llm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    lora.llm.save_pretrained(tmp_path / "adapter")
    again = copy.deepcopy(base)
    again.load_lora(tmp_path / "adapter")
    batch = Collator(model.tokenizer.pad_token_id)([_dataset(model, toy)[i] for i in range(2)])
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        want, got, plain = (m.eval()(*args)["logits"] for m in (lora, again, base))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (want - plain).abs().max() > 1e-3


def test_bad_records_are_skipped_counted_and_reported_once(model, tmp_path):
    data = write_toy_dataset(tmp_path, 6, seed=2)
    recs = json.loads(data.read_text())
    (tmp_path / "images" / "2.png").unlink()
    (tmp_path / "images" / "1.png").write_bytes(b"not a png")
    q = {"from": "human", "value": "<image>\nWhat color is the square?"}
    recs += [{"id": "one-turn", "image": "0.png", "conversations": [q]},
             {"id": "num", "image": 7, "conversations": recs[0]["conversations"]},
             {"id": "vid", "video": "a.mp4", "conversations": recs[0]["conversations"]},
             {"id": "noconv", "image": "0.png"}, ["not", "a", "dict"]]
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, '{"id": "broken", "conversations": [')
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        ds = _dataset(model, path)
    msgs = [str(w.message) for w in caught if "bad record" in str(w.message)]
    assert len(msgs) == 1, msgs  # one report, at the end of construction
    report = msgs[0]
    assert report.startswith("7 bad record(s) of 12 skipped")
    for s in ("line 4: not valid JSON", "id 'one-turn'", "no answer", "id 'num'",
              "'image' must be", "id 'vid'", "'video' 'a.mp4' is not a directory of frames",
              "id 'noconv'", "'conversations' must be", "not a dict", "2.png"):
        assert s in report, s
    assert len(ds) == 5 and len(ds.bad_records) == 7
    with pytest.raises(ValueError, match="7 bad record"):
        _dataset(model, path, strict=True)
    with pytest.warns(UserWarning, match=r"cannot read image .*1\.png"):
        item = ds[1]
    assert item["id"] == 3
    with pytest.raises(ValueError, match="plain template needs"):
        tokenize_conversation(model.tokenizer, [q], image_token_id=model.image_token_id,
                              num_image_tokens=2, template="plain")


def test_multi_image_records_fill_the_image_tokens_in_order(model, tmp_path):
    data = write_toy_dataset(tmp_path, 3, seed=4)
    conv = [{"from": "human", "value": "<image>\nWhat color is the square? <image>"},
            {"from": "gpt", "value": "the square is red"}]
    path = tmp_path / "multi.json"
    path.write_text(json.dumps([{"id": "m", "image": ["0.png", "2.png"], "conversations": conv},
                                {"id": "bad", "image": ["0.png"], "conversations": conv}]))
    with pytest.warns(UserWarning, match=r"record 1 \(id 'bad'\): 2 <image> placeholder\(s\) "
                      r"but 1 image"):
        ds = _dataset(model, path)
    item = ds[0]
    assert item["pixel_values"].shape == (2, 3, 28, 28)
    single = _dataset(model, data)
    torch.testing.assert_close(item["pixel_values"][1], single[2]["pixel_values"][0])
    b = Collator(model.tokenizer.pad_token_id)([item, single[1]])
    assert b["pixel_values"].shape[0] == 3
    with torch.no_grad():
        emb = model.embed(b["input_ids"], b["pixel_values"])
        vis = model.encode_images(b["pixel_values"])
    pos = (b["input_ids"][0] == model.image_token_id).nonzero()[:, 0]
    n = model.num_visual_tokens
    torch.testing.assert_close(emb[0, pos[:n]], vis[0])
    torch.testing.assert_close(emb[0, pos[n:]], vis[1])
    torch.testing.assert_close(emb[1, b["input_ids"][1] == model.image_token_id], vis[2])


def _tok_with(model, *tokens):
    tok = copy.deepcopy(model.tokenizer)
    tok.add_tokens(list(tokens), special_tokens=True)
    return tok


@pytest.mark.parametrize("name,end,text", [
    ("vicuna_v1", "</s>", "questions. USER: <image>\nIs it red? ASSISTANT: Yes</s>USER: Is it "
                          "blue? ASSISTANT: No</s>"),
    ("llava_llama_2", "</s>", "[INST] <<SYS>>\nYou are a helpful language and vision assistant."),
    ("mistral_instruct", "</s>", "[INST] <image>\nIs it red? [/INST] Yes </s>[INST] Is it blue? "
                                 "[/INST] No </s>"),
    ("chatml", "<|im_end|>", "<|im_start|>user\n<image>\nIs it red?<|im_end|>\n<|im_start|>"
                             "assistant\nYes<|im_end|>\n<|im_start|>user\n"),
    ("llama_3", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\nYes<|eot_id|>"
                              "<|start_header_id|>user<|end_header_id|>\n\nIs it blue?"),
])
def test_templates_label_only_the_answers(model, name, end, text):
    from models.mllm.conversation import get_template
    tok = _tok_with(model, "<|im_end|>", "<|eot_id|>", "Yes", "No", "blue", "red", "it")
    conv = [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Is it blue?"}, {"from": "gpt", "value": "No"}]
    assert text in get_template(name).render([c["value"] for c in conv])
    enc = tokenize_conversation(tok, conv, image_token_id=model.image_token_id,
                                num_image_tokens=3, template=name)
    trained = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained) == ["Yes", end, "No", end]
    assert enc["input_ids"].count(model.image_token_id) == 3


def test_tokenizer_chat_template_gives_assistant_only_labels(model):
    tok = _tok_with(model, "<|u|>", "<|a|>", "<|e|>", "Yes", "No", "red", "it")
    tok.chat_template = ("{% for m in messages %}{{ '<|u|>' if m['role'] == 'user' else '<|a|>' }}"
                         "{{ m['content'] }}<|e|>{% endfor %}"
                         "{% if add_generation_prompt %}<|a|>{% endif %}")
    conv = [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "No"}]
    enc = tokenize_conversation(tok, conv, image_token_id=model.image_token_id,
                                num_image_tokens=2, template="chat_template")
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks[:4] == ["<|u|>", "<image>", "<image>", "Is"]
    trained = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained) == ["Yes", "<|e|>", "No", "<|e|>"]
    gen = tokenize_conversation(tok, conv[:3], image_token_id=model.image_token_id,
                                num_image_tokens=2, template="chat_template", for_generation=True)
    assert tok.convert_ids_to_tokens(gen["input_ids"])[-1] == "<|a|>"
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_conversation(model.tokenizer, conv, image_token_id=1, num_image_tokens=1,
                              template="chat_template")


def test_modality_grouped_batches_hold_one_modality():
    from models.mllm.trainer import modality_grouped_indices
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    lengths = [int(x) for x in torch.randint(1, 50, (37,))]
    sign = torch.rand(37) < 0.4
    lengths = [-n if s else n for n, s in zip(lengths, sign)]
    order = modality_grouped_indices(lengths, 4, g)
    assert sorted(order) == list(range(37))
    full = [order[i:i + 4] for i in range(0, len(order), 4)]
    n_full = sum(1 for n in lengths if n > 0) // 4 + sum(1 for n in lengths if n < 0) // 4
    for batch in full[:n_full]:
        assert len({lengths[i] > 0 for i in batch}) == 1, batch
        assert [abs(lengths[i]) for i in batch] == sorted((abs(lengths[i]) for i in batch),
                                                          reverse=True)


def test_pad_aspect_ratio_pads_to_a_square_with_the_mean_colour(model, tmp_path):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng()
    arr = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)  # wide image
    (tmp_path / "images").mkdir()
    Image.fromarray(arr).save(tmp_path / "images" / "w.png")
    conv = [{"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": "red"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": 0, "image": "w.png",
                                                   "conversations": conv}]))
    pad = _dataset(model, tmp_path / "d.json")[0]["pixel_values"][0]
    crop = _dataset(model, tmp_path / "d.json", image_aspect_ratio="crop")[0]["pixel_values"][0]
    proc = model.image_processor
    square = np.zeros((36, 36, 3), np.uint8) + np.array([int(255 * m) for m in proc.image_mean],
                                                        np.uint8)
    square[8:28] = arr
    want = proc(images=Image.fromarray(square), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pad, want)
    assert (pad - crop).abs().max() > 0.1
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        _dataset(model, tmp_path / "d.json", image_aspect_ratio="square")


def test_added_image_token_rows_are_the_mean_so_rebuilds_match():
    import transformers as tf

    from models.mllm.model import ensure_image_token, word_level_tokenizer
    tok = word_level_tokenizer()
    tid = tok.convert_tokens_to_ids("<image>")
    cfg = tf.LlamaConfig(vocab_size=tid, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False)
    lm = tf.LlamaForCausalLM(cfg)
    again = copy.deepcopy(lm)
    assert ensure_image_token(tok, lm) == ensure_image_token(tok, again) == tid
    for a, b in ((lm.get_input_embeddings(), again.get_input_embeddings()),
                 (lm.get_output_embeddings(), again.get_output_embeddings())):
        assert a.weight.shape[0] == len(tok)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        torch.testing.assert_close(a.weight[tid], a.weight[:tid].mean(0))


# ------------------------------------------------------- issue 25: silent wrong training signal
_CHAT = ("{% for m in messages %}{{ '<|u|>' if m['role'] == 'user' else '<|a|>' }}"
         "{{ m['content'] }}<|e|>{% endfor %}{% if add_generation_prompt %}<|a|>{% endif %}")
_END = {"plain": "</s>", "vicuna_v1": "</s>", "llava_llama_2": "</s>", "mistral_instruct": "</s>",
        "chatml": "<|im_end|>", "llama_3": "<|eot_id|>", "chat_template": "<|e|>"}


@pytest.mark.parametrize("name", list(_END))
def test_image_positions_never_carry_labels_wherever_the_placeholder_stands(model, name):
    """An <image> inside an assistant turn (alone, next to one in the question, in a later
    answer) is never a target: LLaVA ignores image positions always. The trained tokens are the
    answers' words (the placeholder removed) and each answer's end, in order."""
    from models.mllm.conversation import TEMPLATE_NAMES
    assert set(_END) == set(TEMPLATE_NAMES)  # every template is covered
    tok = _tok_with(model, "<|im_end|>", "<|eot_id|>", "<|u|>", "<|a|>", "<|e|>", "Yes", "No",
                    "red", "it", "Here")
    tok.chat_template = _CHAT
    end = _END[name]
    h, g = "human", "gpt"
    convs = [([(h, "Describe it"), (g, "Here <image> it is red")],
              ["Here", "it", "is", "red", end]),
             ([(h, "<image>\nIs it red?"), (g, "Yes <image>")], ["Yes", end])]
    if name != "plain":  # plain takes one question and one answer
        convs.append(([(h, "Is it red?"), (g, "Yes"), (h, "<image> Is it blue?"),
                       (g, "<image>No")], ["Yes", end, "No", end]))
    for turns, want in convs:
        conv = [{"from": f, "value": v} for f, v in turns]
        n_ph = sum(v.count("<image>") for _, v in turns)
        counts = [int(c) for c in torch.randint(1, 6, (n_ph,))]
        enc = tokenize_conversation(tok, conv, image_token_id=model.image_token_id,
                                    num_image_tokens=counts, template=name)
        ids, labels = enc["input_ids"], enc["labels"]
        is_image = [i == model.image_token_id for i in ids]
        assert sum(is_image) == sum(counts), (name, turns)
        assert all(lab == IGNORE_INDEX for lab, im in zip(labels, is_image) if im), (name, turns)
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tok.convert_ids_to_tokens(trained) == want, (name, turns)


def _first_label(enc):
    return next(k for k, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)


def test_records_whose_answers_max_length_cuts_off_are_skipped_at_build(model, tmp_path):
    """A record whose first answer token lies at or past max_length would train on nothing:
    skipped when the dataset is built, counted, reported once; a dataset where every record is
    so is an error naming model_max_length. The boundary is exact: one position more keeps the
    record with exactly one trained token."""
    import random as _r
    data = write_toy_dataset(tmp_path, 5, seed=_r.randrange(10**6))
    recs = json.loads(data.read_text())
    long = _r.randrange(1, len(recs))
    recs[long]["conversations"][0]["value"] += " the square" * _r.randint(5, 20)
    data.write_text(json.dumps(recs))
    first = [_first_label(tokenize_conversation(
        model.tokenizer, r["conversations"], image_token_id=model.image_token_id,
        num_image_tokens=model.num_visual_tokens)) for r in recs]
    assert first[long] > max(f for i, f in enumerate(first) if i != long)
    with pytest.warns(UserWarning, match=rf"1 bad record\(s\) of 5 skipped: record {long} "
                      rf"\(id {long}\): max_length={first[long]} .*no answer token"):
        ds = _dataset(model, data, max_length=first[long])
    assert len(ds) == 4 and len(ds.bad_records) == 1 and long not in [r["id"] for r in ds.records]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to find when read
        items = [ds[i] for i in range(len(ds))]
    assert all(any(lab != IGNORE_INDEX for lab in it["labels"]) for it in items)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = _dataset(model, data, max_length=first[long] + 1)
    item = kept[long]
    assert item["id"] == long and len(item["input_ids"]) == first[long] + 1
    assert [lab for lab in item["labels"] if lab != IGNORE_INDEX] == [item["input_ids"][-1]]
    with pytest.raises(ValueError, match=f"record {long}.*max_length"):
        _dataset(model, data, max_length=first[long], strict=True)
    with pytest.raises(ValueError, match=r"model_max_length.*no answer token.*every record"):
        _dataset(model, data, max_length=min(first))
    # an answer that starts with its image: max_length right after the image tokens keeps every
    # image token and no answer token
    recs[0]["conversations"] = [{"from": "human", "value": "What color is the square?"},
                                {"from": "gpt", "value": "<image> the square is red"}]
    data.write_text(json.dumps(recs[:1]))
    enc = tokenize_conversation(model.tokenizer, recs[0]["conversations"],
                                image_token_id=model.image_token_id,
                                num_image_tokens=model.num_visual_tokens)
    at = _first_label(enc)
    assert enc["input_ids"][at - 1] == model.image_token_id  # right after the image run
    with pytest.raises(ValueError, match=rf"max_length={at} \(--model_max_length\) leaves no "
                                         rf"answer token in every record"):
        _dataset(model, data, max_length=at)
    labels = _dataset(model, data, max_length=at + 1)[0]["labels"]
    assert sum(lab != IGNORE_INDEX for lab in labels) == 1


def test_records_bad_only_when_read_are_caught_at_build_and_reported_once(model, tmp_path):
    """Conversations that used to fail only when read (first turn from gpt, a system turn, an
    unknown role, two user turns in a row) are found when the dataset is built: counted, named
    in the one report, and never warned about again when read. A record that still fails when
    read (an undecodable image) is warned about once and counted, not once per epoch."""
    data = write_toy_dataset(tmp_path, 4, seed=5)
    recs = json.loads(data.read_text())
    q, a = recs[0]["conversations"]
    bad = [("gpt-first", [a, q]), ("system", [{"from": "system", "value": "Be brief."}, q, a]),
           ("bot", [q, {"from": "bot", "value": "red"}]),
           ("two-humans", [q, {"from": "human", "value": "Is it red?"}, a])]
    recs += [{"id": i, "image": "0.png", "conversations": c} for i, c in bad]
    data.write_text(json.dumps(recs))
    with pytest.warns(UserWarning) as caught:
        ds = _dataset(model, data)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and msgs[0].startswith("4 bad record(s) of 8 skipped"), msgs
    for i, _ in bad:
        assert f"id {i!r}" in msgs[0], i
    assert "alternate" in msgs[0] and "'system'" in msgs[0] and "'bot'" in msgs[0]
    assert len(ds) == 4 and len(ds.bad_records) == 4
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")
    for epoch in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = [ds[i]["id"] for i in range(len(ds))]
        assert got == [0, 1, 3, 3], got  # record 2 served by the next one
        assert len(seen) == (1 if epoch == 0 else 0), [str(w.message) for w in seen]
        assert len(ds.bad_records) == 5
    with pytest.raises(ValueError, match="4 bad record"):
        _dataset(model, data, strict=True)


def test_chat_template_without_one_is_a_configuration_error(model, toy):
    assert not getattr(model.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match=r"--version chat_template.*no chat_template"):
        _dataset(model, toy, template="chat_template")


def test_modality_lengths_are_never_zero(model, tmp_path):
    recs = [{"id": 0, "conversations": [{"from": "human", "value": ""},
                                        {"from": "gpt", "value": ""}]},
            {"id": 1, "conversations": [{"from": "human", "value": "What color"},
                                        {"from": "gpt", "value": "red"}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ds = _dataset(model, tmp_path / "d.json")
    assert ds.modality_lengths == [-1, -3]


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, database=None)
@given(lengths=st.lists(st.integers(-40, 40), min_size=1, max_size=60),
       per_device=st.integers(1, 5), world=st.integers(1, 4), epoch=st.integers(0, 3),
       seed=st.integers(0, 2**31))
def test_modality_grouped_sampler_yields_every_record_once_per_epoch(lengths, per_device, world,
                                                                     epoch, seed):
    """Length estimates of 0 included (text): each epoch the sampler yields every index exactly
    once (len(sampler) of them); sharded as accelerate shards Trainer's batches (rank r takes
    every world-th per-device batch), the ranks' k-th batches cut from full runs are together
    one modality (every rank runs the tower, or none: ZeRO-3 needs that), and the ranks
    together see every record."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from models.mllm.trainer import ModalityGroupedSampler
    s = ModalityGroupedSampler(lengths, per_device * world, seed)
    s.set_epoch(epoch)
    order = list(s)
    assert len(order) == len(s) == len(lengths)
    assert sorted(order) == list(range(len(lengths)))
    image = [n > 0 for n in lengths]
    run = per_device * world
    n_full = sum(image) // run + (len(lengths) - sum(image)) // run
    shards = [list(BatchSamplerShard(BatchSampler(s, per_device, False), world, rank))
              for rank in range(world)]
    for k in range(n_full):
        step = [i for shard in shards for i in shard[k]]
        assert len(step) == run and len({image[i] for i in step}) == 1, (k, step)
    assert {i for shard in shards for b in shard for i in b} == set(range(len(lengths)))


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_build_time_truncation_check_agrees_with_full_tokenisation(model, data):
    """truncation_problem (tokenises only up to the first target and the last image token)
    decides exactly as the full tokenisation: image tokens past max_length -> image cut; else
    the first target at or past it -> no answer token; else fine. Every template, <image> in
    questions and answers, empty answers, max_length around every boundary."""
    from models.mllm.conversation import TEMPLATE_NAMES, truncation_problem
    tok = _tok_with(model, "<|im_end|>", "<|eot_id|>", "<|u|>", "<|a|>", "<|e|>", "Yes", "No",
                    "red", "it", "Here")
    tok.chat_template = _CHAT
    name = data.draw(st.sampled_from(TEMPLATE_NAMES))
    words = st.lists(st.sampled_from(["Yes", "No", "red", "it", "Here", "the", "<image>"]),
                     max_size=6).map(" ".join)
    rounds = 1 if name == "plain" else data.draw(st.integers(1, 3))
    conv = [{"from": f, "value": data.draw(words)} for _ in range(rounds)
            for f in ("human", "gpt")]
    n_ph = sum(c["value"].count("<image>") for c in conv)
    counts = data.draw(st.lists(st.integers(1, 4), min_size=n_ph, max_size=n_ph))
    kw = dict(image_token_id=model.image_token_id, num_image_tokens=counts, template=name)
    enc = tokenize_conversation(tok, conv, **kw)
    ids, labels = enc["input_ids"], enc["labels"]
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    images = [k for k, i in enumerate(ids) if i == model.image_token_id]
    limit = data.draw(st.sampled_from(sorted({1, first, first + 1, len(ids), len(ids) + 1,
                                              *[k + d for k in images for d in (0, 1)]})))
    got = truncation_problem(tok, conv, max_length=limit, **kw)
    if images and images[-1] >= limit:
        assert got is not None and "would truncate the image tokens" in got, (got, limit)
    elif first >= limit:
        assert got is not None and "leaves no answer token" in got, (got, limit)
    else:
        assert got is None, (got, limit)
    assert truncation_problem(tok, conv, max_length=None, **kw) is None


@pytest.mark.parametrize("layer", [-2, -1, 1, [-3, -2]])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_unfrozen_tower_trains_exactly_what_feeds_the_features(toy, tower, layer):
    """freeze_vision_tower=False on a 3-layer tower: the tower parameters marked trainable are
    exactly those the loss depends on, as autograd finds them with the whole tower trainable
    (the later layers, the post-layernorm, SigLIP's head are not); after one backward every
    trainable parameter of the model has a gradient (DDP needs no find_unused_parameters),
    the tower's non-zero."""
    import transformers as tf
    from models.mllm.model import default_image_processor
    comp = tiny_components(TOY_WORDS, vision_layers=3)
    if tower == "siglip":
        comp["vision_tower"] = tf.SiglipVisionConfig(
            image_size=28, patch_size=4, hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=2)
        comp["image_processor"] = default_image_processor(comp["vision_tower"])
    model = MLLM.build(**comp, projector="mlp2x_gelu", vision_feature_layer=layer,
                       freeze_vision_tower=False).double()
    ds = _dataset(model, toy, template="plain")
    batch = Collator(model.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    batch["pixel_values"] = batch["pixel_values"].double()

    def tower_grads():
        model.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        return {n: p.grad for n, p in model.vision_tower.named_parameters()
                if p.grad is not None}

    trainable = {n for n, p in model.vision_tower.named_parameters() if p.requires_grad}
    grads = tower_grads()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(g.abs().max() > 0 for g in grads.values())
    frozen = {n for n, _ in model.vision_tower.named_parameters()} - trainable
    assert any(n.startswith("post_layernorm.") for n in frozen), frozen
    assert tower == "clip" or any(n.startswith("head.") for n in frozen), frozen
    model.vision_tower.requires_grad_(True)
    assert set(tower_grads()) == trainable
    model.set_vision_tower_trainable(False)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_loss_is_computed_in_the_logits_precision_or_float32(model, toy, dtype):
    """The loss of a float64 model is float64 (equal to a float64 log-softmax of its logits to
    ~1e-12; a float32 softmax is ~1e-7 off); 16-bit logits are upcast to float32."""
    import copy
    m = copy.deepcopy(model).to(dtype)
    ds = _dataset(m, toy, template="plain")
    b = Collator(m.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    b["pixel_values"] = b["pixel_values"].to(dtype)
    with torch.no_grad():
        out = m(**b)
    logits, labels = out["logits"][:, :-1], b["labels"][:, 1:]
    assert logits.dtype == dtype
    keep = labels != IGNORE_INDEX
    logp = logits.double().log_softmax(-1)
    want = -logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum()
    assert out["loss_sum"].dtype == torch.promote_types(dtype, torch.float32)
    assert int(out["num_tokens"]) == int(keep.sum()) > 0
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out["loss_sum"].double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(out["loss"].double(), want / keep.sum(), rtol=rtol, atol=0)
