"""Several images of different sizes and video frames per sample (the ``native`` resize policy):
the resize rule, the packed tower -> projector -> per-placeholder splice against a manual
construction, the dataset / collator, one training step, and the errors. Tiny models built in
code, as tests/test_mllm.py."""
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from models.mllm import MLLM, tiny_components  # noqa: E402
from models.mllm.conversation import IGNORE_INDEX, tokenize_conversation  # noqa: E402
from models.mllm.data import TOY_WORDS, Collator, LLaVADataset, native_size  # noqa: E402
from models.projectors.common import Projector  # noqa: E402
from models.projectors.mlp import MLP2xGELUProjector  # noqa: E402

PATCH = 4  # tiny_components: 28x28 images, 4x4 patches, a 7x7 grid


@pytest.fixture(scope="module")
def model():
    return MLLM.build(**tiny_components(TOY_WORDS), projector="mlp2x_gelu").eval()


def _image(folder, name, width, height):
    from PIL import Image
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng().integers(0, 256, (height, width, 3), np.uint8)
                    ).save(path)
    return name


def _runs(ids, token):
    """Lengths of the maximal runs of ``token`` in ``ids``, with their start positions."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


# ----------------------------------------------------------------------------- resize policy
def test_native_size_keeps_aspect_fits_max_pixels_and_patch_multiples():
    rng = random.Random()
    for _ in range(500):
        patch = rng.choice([4, 14, 16])
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        max_pixels = rng.randint(patch * patch * 4, 500_000)
        try:
            rw, rh = native_size(w, h, max_pixels, patch)
        except ValueError as e:  # only when one patch on the short side is already too much
            assert "does not fit" in str(e)
            s = math.sqrt(max_pixels / (w * h))
            assert min(w, h) * s < patch
            continue
        assert rw % patch == 0 and rh % patch == 0 and rw >= patch and rh >= patch
        assert rw * rh <= max_pixels
        s = min(1.0, math.sqrt(max_pixels / (w * h)))  # never upscaled
        assert abs(rw - w * s) < patch and abs(rh - h * s) < patch, (w, h, rw, rh, s)
        nearest = (max(patch, round(w * s / patch) * patch), max(patch, round(h * s / patch) * patch))
        if nearest[0] * nearest[1] <= max_pixels:
            assert (rw, rh) == nearest
    # worked by hand: 1000x500 over 80000 px -> x0.4 = 400x200 -> multiples of 14: 406x196
    assert native_size(1000, 500, 80_000, 14) == (406, 196)
    assert native_size(30, 17, 10_000, 4) == (32, 16)  # under the budget: only rounded
    with pytest.raises(ValueError, match="does not fit max_pixels=1024"):
        native_size(4000, 2, 1024, 16)
    with pytest.raises(ValueError, match="max_pixels"):
        native_size(10, 10, 0, 4)


# ------------------------------------------------------------------------ model: the splice
def test_packed_splice_puts_each_image_at_its_placeholder(model):
    """Row 0: text, image A (12x20), text, image B (16x8), text. Row 1: a 3-frame video (frames
    the size of A, so the tower batches them with A), text, image C at the tower's 28x28. Every
    image's tokens must be exactly the tower + projector run on that image alone, at the
    positions where the manual construction put its placeholder; text keeps its embeddings."""
    tok, img = model.tokenizer, model.image_token_id
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sizes = [(12, 20), (16, 8), (12, 20), (12, 20), (12, 20), (28, 28)]  # A, B, F0-F2, C
    pix = [torch.randn(3, h, w) for h, w in sizes]
    counts = [(h // PATCH) * (w // PATCH) for h, w in sizes]
    row0 = [(words("What color"), None), ([img] * counts[0], 0), (words("is the"), None),
            ([img] * counts[1], 1), (words("square ?"), None)]
    row1 = [(words("describe"), None), ([img] * sum(counts[2:5]), (2, 3, 4)),
            (words("the image"), None), ([img] * counts[5], 5), (words("a"), None)]
    seqs, where = [], {}
    for b, row in enumerate((row0, row1)):
        ids = [tok.bos_token_id]
        for piece, image in row:
            if image is not None:
                start = len(ids)
                for i in (image,) if isinstance(image, int) else image:
                    where[i] = (b, start)
                    start += counts[i]
            ids += piece
        seqs.append(ids)
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = torch.where((ids == img) | (mask == 0), IGNORE_INDEX, ids)

    with torch.no_grad():
        emb = model.embed(ids, pix, torch.tensor([[h // PATCH, w // PATCH] for h, w in sizes]))
        text = model.llm.get_input_embeddings()(ids)
        for i, x in enumerate(pix):
            hs = model.vision_tower(pixel_values=x[None], output_hidden_states=True,
                                    interpolate_pos_encoding=True).hidden_states[-2][0, 1:]
            want = model.projector.mlp(hs)
            assert want.shape[0] == counts[i] == model.packed_tokens_for_grid(
                (sizes[i][0] // PATCH, sizes[i][1] // PATCH))
            b, s = where[i]
            torch.testing.assert_close(emb[b, s:s + counts[i]], want, rtol=1e-5, atol=1e-5)
    is_img = ids == img
    torch.testing.assert_close(emb[~is_img], text[~is_img], rtol=0, atol=0)
    assert int(is_img.sum()) == sum(counts)

    # one training step's gradient reaches the projector, finite
    model.zero_grad()
    out = model(ids, mask, pix, labels, visual_grids=[(h // PATCH, w // PATCH) for h, w in sizes])
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for n, p in model.projector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.vision_tower.parameters())
    model.zero_grad()


def test_siglip_tower_no_cls_packed(model):
    """SigLIP (no CLS token) at a native grid: the packed splice equals the image alone."""
    import transformers as tf
    comp = tiny_components(TOY_WORDS)
    cfg = tf.SiglipVisionConfig(image_size=28, patch_size=PATCH, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    m = MLLM.build(cfg, comp["llm"], "mlp2x_gelu", tokenizer=comp["tokenizer"],
                   image_processor=comp["image_processor"]).eval()
    pix = [torch.randn(3, 28, 28), torch.randn(3, 12, 20)]
    ids = torch.tensor([[1] + [m.image_token_id] * 49 + [5] + [m.image_token_id] * 15])
    with torch.no_grad():
        emb = m.embed(ids, pix)
        for x, s in zip(pix, (1, 51)):
            hs = m.vision_tower(pixel_values=x[None], output_hidden_states=True,
                                interpolate_pos_encoding=True).hidden_states[-2][0]
            torch.testing.assert_close(emb[0, s:s + hs.shape[0]], m.projector.mlp(hs))


def test_packed_inputs_are_checked(model):
    tok, img = model.tokenizer, model.image_token_id
    x = [torch.randn(3, 12, 20), torch.randn(3, 8, 8)]  # 15 and 4 tokens
    ids = torch.tensor([[tok.bos_token_id] + [img] * 15 + [5] + [img] * 4])
    with torch.no_grad():
        model.embed(ids, x)  # consistent
        with pytest.raises(ValueError, match=r"pixel_values\[1\] must be a \[3, H, W\]"):
            model.embed(ids, [x[0], torch.randn(3, 8, 10)])
        with pytest.raises(ValueError, match="visual_grids"):
            model.embed(ids, x, [(3, 5), (1, 4)])
        with pytest.raises(ValueError, match="does not hold whole images"):  # off by one
            model.embed(torch.tensor([[1] + [img] * 14 + [5] + [img] * 5]), x)
        with pytest.raises(ValueError, match="does not hold whole images"):  # swapped
            model.embed(torch.tensor([[1] + [img] * 4 + [5] + [img] * 15]), x)
        with pytest.raises(ValueError, match="image tokens for 1 image"):
            model.embed(ids[:, :17], x)


class _Unpacked(MLP2xGELUProjector):
    tokens_for_grid = Projector.tokens_for_grid  # raises NotImplementedError, as before packing


def test_projector_without_packed_batches_is_refused(model, tmp_path):
    from models.mllm.train import train
    proj = _Unpacked(32, 64, (7, 7))
    m = MLLM(model.vision_tower, proj, model.llm, model.image_token_id,
             tokenizer=model.tokenizer, image_processor=model.image_processor)
    ids = torch.tensor([[1] + [m.image_token_id] * 15])
    with pytest.raises(ValueError, match=r"does not take packed batches.*--image_resize fixed"):
        m.embed(ids, [torch.randn(3, 12, 20)])
    with torch.no_grad():  # the fixed-size path is untouched
        m.embed(torch.tensor([[1] + [m.image_token_id] * 49]), torch.randn(1, 3, 28, 28))
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(ValueError, match="does not take packed batches"):
        train(dict(data_path=str(tmp_path / "d.json"), output_dir=str(tmp_path / "o"),
                   image_resize="native", use_cpu=True), model=m)


# -------------------------------------------------------------- dataset, collator, training
def _varres_data(folder):
    """Record 0: two images of different sizes; 1: a video directory of 3 frames named 1, 2,
    10 (natural order); 2: the same frames as a list; 3: one image."""
    _image(folder, "a.png", 30, 17)
    _image(folder, "b.png", 20, 44)
    _image(folder, "c.png", 28, 28)
    frames = [_image(folder, f"clip/{n}.png", 24, 16) for n in (1, 2, 10)]
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    recs = [{"id": "two", "image": ["a.png", "b.png"],
             "conversations": ask("<image>\nWhat color is the square? <image>",
                                  "the square is red")},
            {"id": "vdir", "video": "clip", "conversations": ask("<image>\ndescribe the image",
                                                                 "a blue square")},
            {"id": "vlist", "video": frames, "conversations": ask("describe the image <image>",
                                                                  "a green square")},
            {"id": "one", "image": "c.png", "conversations": ask("<image>\nWhat color ?",
                                                                 "yellow")}]
    (folder / "d.json").write_text(json.dumps(recs))
    return folder / "d.json", frames


def _native(model, data, folder, max_pixels=400, **kw):
    return LLaVADataset(data, folder, model.tokenizer, model.image_processor,
                        image_token_id=model.image_token_id,
                        num_image_tokens=model.num_visual_tokens, image_resize="native",
                        max_pixels=max_pixels, patch_size=model.patch_size,
                        tokens_for_grid=model.packed_tokens_for_grid, **kw)


def test_native_dataset_items_and_collator(model, tmp_path):
    from PIL import Image
    data, frames = _varres_data(tmp_path)
    ds = _native(model, data, tmp_path)
    img = model.image_token_id
    items = [ds[i] for i in range(4)]
    names = [["a.png", "b.png"], frames, frames, ["c.png"]]
    for item, files in zip(items, names):
        assert len(item["pixel_values"]) == len(files) == len(item["visual_grids"])
        for x, g, f in zip(item["pixel_values"], item["visual_grids"], files):
            want = native_size(*Image.open(tmp_path / f).size, 400, PATCH)  # (w, h)
            assert tuple(x.shape) == (3, want[1], want[0])
            assert g == (want[1] // PATCH, want[0] // PATCH)
    counts = [[g[0] * g[1] for g in it["visual_grids"]] for it in items]
    assert counts[0][0] != counts[0][1]  # the two images give different token counts
    runs = [[n for _, n in _runs(it["input_ids"], img)] for it in items]
    assert runs == [counts[0], [sum(counts[1])], [sum(counts[2])], counts[3]]
    for a, b in zip(items[1]["pixel_values"], items[2]["pixel_values"]):  # 1, 2, 10 order
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    frame10 = ds._native_pixels(Image.open(tmp_path / "clip/10.png").convert("RGB"))
    torch.testing.assert_close(items[1]["pixel_values"][2], frame10, rtol=0, atol=0)

    batch = Collator(model.tokenizer.pad_token_id)([items[0], items[1]])
    assert len(batch["pixel_values"]) == 5
    assert batch["visual_grids"].tolist() == [list(g) for g in
                                              items[0]["visual_grids"] + items[1]["visual_grids"]]
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out["loss"])
    fixed = LLaVADataset(data, tmp_path, model.tokenizer, model.image_processor,
                         image_token_id=img, num_image_tokens=model.num_visual_tokens)
    with pytest.raises(ValueError, match="mix the fixed and native"):
        Collator(model.tokenizer.pad_token_id)([items[0], fixed[0]])
    assert fixed[1]["pixel_values"].shape == (3, 3, 28, 28)  # video frames, fixed policy
    assert fixed[1]["input_ids"].count(img) == 3 * 49


def test_one_training_step_on_mixed_sizes_and_video(tmp_path):
    from models.mllm.train import train
    data, _ = _varres_data(tmp_path)
    m = MLLM.build(**tiny_components(TOY_WORDS), projector="mlp2x_gelu")
    before = {n: p.detach().clone() for n, p in m.projector.named_parameters()}
    res = train(dict(data_path=str(data), image_folder=str(tmp_path),
                     output_dir=str(tmp_path / "out"), stage=1, image_resize="native",
                     max_pixels=400, max_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-2, warmup_ratio=0.0, save_strategy="no",
                     disable_tqdm=True, use_cpu=True, dataloader_num_workers=0), model=m)
    assert res["step"] == 1 and math.isfinite(res["losses"][0]) and res["bad_records"] == 0
    for n, p in m.projector.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


def test_sample_errors_name_the_record_and_field(model, tmp_path):
    _varres_data(tmp_path)
    _image(tmp_path, "thin.png", 400, 2)
    ask = [{"from": "human", "value": "<image>\nWhat ?"}, {"from": "gpt", "value": "red"}]
    two = [{"from": "human", "value": "<image> <image>\nWhat ?"}, {"from": "gpt", "value": "red"}]
    recs = [{"id": "ph", "image": ["a.png", "b.png"], "conversations": ask},
            {"id": "vph", "video": "clip", "conversations": two},
            {"id": "gone", "video": ["clip/1.png", "clip/3.png"], "conversations": ask},
            {"id": "both", "image": "a.png", "video": "clip", "conversations": ask},
            {"id": "thin", "image": "thin.png", "conversations": ask},
            {"id": "ok", "image": "c.png", "conversations": ask}]
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError) as info:
        _native(model, tmp_path / "bad.json", tmp_path, max_pixels=64, strict=True)
    msg = str(info.value)
    for want in ("record 0 (id 'ph'): 1 <image> placeholder(s) but 2 image(s) in 'image'",
                 "record 1 (id 'vph'): 'video': 2 <image> placeholder(s)",
                 "record 2 (id 'gone'): missing file(s): video[1] 'clip/3.png'",
                 "record 3 (id 'both'): has both 'image' and 'video'",
                 # found when the dataset is built (the image's header), not when read
                 "record 4 (id 'thin'): image[0] 'thin.png': a 400x2 image does not fit "
                 "max_pixels=64"):
        assert want in msg, msg
    (tmp_path / "bad.json").write_text(json.dumps(recs[4:]))
    with pytest.warns(UserWarning, match=r"1 bad record\(s\) of 2 skipped: record 0 \(id "
                      r"'thin'\): image\[0\]"):
        ds = _native(model, tmp_path / "bad.json", tmp_path, max_pixels=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ds) == 1 and ds[0]["id"] == "ok"
    with pytest.raises(ValueError, match="image_aspect_ratio applies to image_resize='fixed'"):
        _native(model, tmp_path / "bad.json", tmp_path, image_aspect_ratio="pad")
    with pytest.raises(ValueError, match="max_pixels applies"):
        LLaVADataset(tmp_path / "bad.json", tmp_path, model.tokenizer, model.image_processor,
                     image_token_id=1, num_image_tokens=49, max_pixels=400)


def test_flags_and_per_placeholder_counts():
    from models.mllm.train import parse_args
    _, d, _ = parse_args({"data_path": "x", "image_resize": "native", "max_pixels": 1000})
    assert (d.image_resize, d.max_pixels) == ("native", 1000)
    with pytest.raises(ValueError, match="image_aspect_ratio applies"):
        parse_args({"data_path": "x", "image_resize": "native", "image_aspect_ratio": "pad"})
    with pytest.raises(ValueError, match="max_pixels"):
        parse_args({"data_path": "x", "max_pixels": 1000})
    with pytest.raises(ValueError, match="image_resize"):
        parse_args({"data_path": "x", "image_resize": "anyres"})
    from models.mllm import word_level_tokenizer
    tok = word_level_tokenizer()
    conv = [{"from": "human", "value": "<image> What <image>"}, {"from": "gpt", "value": "Yes"}]
    for template in ("vicuna_v1", "plain"):
        enc = tokenize_conversation(tok, conv, image_token_id=4, num_image_tokens=[3, 5],
                                    template=template)
        assert [n for _, n in _runs(enc["input_ids"], 4)] == ([3, 5] if template != "plain"
                                                               else [8])
        same = tokenize_conversation(tok, conv, image_token_id=4, num_image_tokens=[2, 2],
                                     template=template)
        assert same == tokenize_conversation(tok, conv, image_token_id=4, num_image_tokens=2,
                                             template=template)
    with pytest.raises(ValueError, match="lists 1 count"):
        tokenize_conversation(tok, conv, image_token_id=4, num_image_tokens=[3])


def test_native_answer_cut_decided_at_build_with_each_images_own_count(model, tmp_path):
    """Native images give grid-dependent token counts: the build-time check uses each image's
    own count (from its header), so the boundary is exact: max_length at a record's first
    answer position drops it (counted, reported), one more keeps it with one trained token."""
    data, _ = _varres_data(tmp_path)
    full = _native(model, data, tmp_path)
    items = [full[i] for i in range(len(full))]
    first = [next(k for k, lab in enumerate(it["labels"]) if lab != IGNORE_INDEX) for it in items]
    counts = [sum(n for _, n in _runs(it["input_ids"], model.image_token_id)) for it in items]
    assert len(set(counts)) > 1 and counts[0] != 2 * model.num_visual_tokens
    k = 0  # two images of different sizes
    for limit in (first[k], first[k] + 1):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ds = _native(model, data, tmp_path, max_length=limit)
        cut = [i for i in range(len(items)) if first[i] >= limit]
        assert [w for w, _ in ds.bad_records] == [f"record {i} (id {full.records[i]['id']!r})"
                                                  for i in cut]
        for (_, why), i in zip(ds.bad_records, cut):  # image tokens past the limit, or none
            end = max(s + n for s, n in _runs(items[i]["input_ids"], model.image_token_id))
            want = "would truncate the image tokens" if end > limit else "leaves no answer token"
            assert f"max_length={limit} {want}" in why, (i, why)
        assert len(seen) == bool(cut) and len(ds) == len(items) - len(cut)
    assert k not in cut  # kept at first + 1, with exactly one trained token
    it = ds[k]
    assert len(it["input_ids"]) == first[k] + 1
    assert [lab for lab in it["labels"] if lab != IGNORE_INDEX] == [it["input_ids"][-1]]
