"""MLLM, conversation template and LLaVA data on CPU with tiny models built in code."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from models.mllm.conversation import IGNORE_INDEX, tokenize_conversation  # noqa: E402
from models.mllm.data import (TOY_WORDS, Collator, LLaVADataset, global_batches,  # noqa: E402
                         write_toy_dataset)
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


def test_missing_and_corrupt_images_are_reported(model, tmp_path):
    data = write_toy_dataset(tmp_path, 4, seed=2)
    (tmp_path / "images" / "2.png").unlink()
    (tmp_path / "images" / "1.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) missing .*2\.png"):
        ds = _dataset(model, data)
    assert len(ds) == 3 and ds.missing_files == ["2.png"]
    with pytest.raises(FileNotFoundError, match=r"2\.png"):
        _dataset(model, data, on_missing="error")
    with pytest.warns(UserWarning, match=r"cannot read image .*1\.png"):
        item = ds[1]
    assert item["skipped"] == 1 and item["id"] == 3
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], item])
    assert batch["skipped"] == 1 and batch["num_images"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[0]["skipped"] == 0


def test_global_batches_shard_disjointly():
    one = global_batches(21, global_batch=8, per_device_batch=2, world_size=1, rank=0, seed=5,
                         epoch=1)
    two = [global_batches(21, global_batch=8, per_device_batch=2, world_size=2, rank=r, seed=5,
                          epoch=1) for r in range(2)]
    assert len(one) == 3 and all(len(s) == 4 for s in one) and all(len(s) == 2 for s in two[0])
    for s in range(3):
        a = [i for mb in two[0][s] for i in mb]
        b = [i for mb in two[1][s] for i in mb]
        assert not set(a) & set(b)
        assert a + b == [i for mb in one[s] for i in mb]
    flat = [i for s in one for mb in s for i in mb]
    assert sorted(set(flat)) == list(range(21))
    assert one != global_batches(21, global_batch=8, per_device_batch=2, world_size=1, rank=0,
                                 seed=5, epoch=2)
    with pytest.raises(ValueError, match="multiple"):
        global_batches(21, global_batch=8, per_device_batch=3, world_size=1, rank=0, seed=0,
                       epoch=0)
