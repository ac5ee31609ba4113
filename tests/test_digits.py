"""The digit-grid study (models/digits): dataset builder, full-model training option, a micro
end-to-end run of run.py, relevance maps."""
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from models import build_projector  # noqa: E402
from models.digits import dataset as dd  # noqa: E402
from models.digits.relevance import (capture_attention, cell_of, mass_in_cell,  # noqa: E402
                                     mllm_relevance, projector_relevance)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return dd.build_digit_dataset(tmp_path_factory.mktemp("digits"), n_train=40, n_test=12)


def _expected(question: str, lab: np.ndarray) -> str:
    """Answers recomputed from the label grid, independently of the builder."""
    if question == "read the digits row by row .":
        return " ".join(str(d) for row in lab for d in row)
    if m := re.fullmatch(r"which digit is in row (\d) , column (\d) \?", question):
        return str(lab[int(m[1]) - 1, int(m[2]) - 1])
    if m := re.fullmatch(r"how many (\d)s are there \?", question):
        return str(int((lab == int(m[1])).sum()))
    pos = {}
    for (r, c), v in np.ndenumerate(lab):
        pos.setdefault(int(v), []).append((r, c))
    if m := re.fullmatch(r"is the (\d) (left|above) of the (\d) \?", question):
        (a,), (b,) = pos[int(m[1])], pos[int(m[3])]  # each occurs exactly once
        k = 1 if m[2] == "left" else 0
        return "yes" if a[k] < b[k] else "no"
    if m := re.fullmatch(r"what digit is (right|below) of the (\d) \?", question):
        ((r, c),) = pos[int(m[2])]
        return str(lab[r, c + 1] if m[1] == "right" else lab[r + 1, c])
    raise AssertionError(f"unexpected question {question!r}")


def test_dataset_answers_and_pixels_come_from_the_composed_digits(built):
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    train = json.load(open(built["train"]))
    test = json.load(open(built["test"]))
    assert len(train) == 40 and len(test) == 12 * len(dd.QTYPES)
    seen_types = set()
    for rec in train + test:
        lab = np.array(rec["labels"])
        idx = np.array(rec["digit_index"])
        assert lab.shape == (3, 3) and (digits.target[idx] == lab).all()
        convs = rec["conversations"]
        assert convs[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in convs) == 1
        for h, g in zip(convs[::2], convs[1::2]):
            q = h["value"].removeprefix("<image>\n")
            assert g["value"] == _expected(q, lab), (q, lab)
            assert len(g["value"].split()) == (9 if q.startswith("read") else 1)
        if "qtype" in rec:
            seen_types.add(rec["qtype"])
            assert rec["answer"] == convs[1]["value"]
        else:
            assert sorted(rec["qtypes"]) == sorted(dd.QTYPES) and len(convs) == 2 * len(dd.QTYPES)
        pix = np.asarray(Image.open(built["image_folder"] / rec["image"]))
        assert pix.shape == (24, 24)
        want = np.block([[digits.images[i] for i in row] for row in idx]) * 255 / 16
        np.testing.assert_allclose(pix, want, atol=0.5)
    assert seen_types == set(dd.QTYPES)
    ans = [r["answer"] for r in test if r["qtype"] == "relation"]
    assert set(ans) <= {"yes", "no"}
    ch = built["chance"]
    assert ch["relation"]["uniform"] == 0.5 and ch["local"]["uniform"] == 0.1
    assert ch["count"]["uniform"] == pytest.approx(1 / 10)
    cnt = [r["answer"] for r in test if r["qtype"] == "count"]
    assert ch["count"]["majority"] == max(cnt.count(a) for a in set(cnt)) / len(cnt)
    digits_read = [d for r in test if r["qtype"] == "read" for d in r["answer"].split()]
    assert ch["read"]["uniform"] == 0.1 and len(digits_read) == 12 * 9
    assert ch["read"]["majority"] == max(map(digits_read.count, set(digits_read))) / 108


def test_read_is_scored_per_digit_and_other_types_exactly():
    assert dd.score("read", "1 2 3 4 5 6 7 8 9", "1 2 3 4 5 6 7 8 9") == 1.0
    assert dd.score("read", "1 2 3 0 5 6 7 8", "1 2 3 4 5 6 7 8 9") == pytest.approx(7 / 9)
    assert dd.score("read", "", "1 2 3 4 5 6 7 8 9") == 0.0
    assert dd.score("local", "7", "7") == 1.0 and dd.score("local", "7 7", "7") == 0.0


def test_qtypes_select_the_questions(tmp_path):
    b = dd.build_digit_dataset(tmp_path, n_train=6, n_test=4, qtypes=("read", "local"))
    train, test = json.load(open(b["train"])), json.load(open(b["test"]))
    assert all(sorted(r["qtypes"]) == ["local", "read"] for r in train)
    assert sorted({r["qtype"] for r in test}) == ["local", "read"] and len(test) == 8
    assert set(b["chance"]) == {"local", "read"}


def test_train_and_test_use_disjoint_handwriting(built):
    train = json.load(open(built["train"]))
    test = json.load(open(built["test"]))
    tr = {i for r in train for i in np.ravel(r["digit_index"])}
    te = {i for r in test for i in np.ravel(r["digit_index"])}
    cut = len(dd.digit_split("train")[1])
    assert tr and te and not tr & te
    assert max(tr) < cut <= min(te)
    assert cut + len(dd.digit_split("test")[1]) == 1797


def test_json_loads_through_the_trainer_dataset(built):
    from models.mllm.data import LLaVADataset
    from models.mllm import default_image_processor, word_level_tokenizer
    import transformers as tf
    tok = word_level_tokenizer(built["words"])
    proc = default_image_processor(tf.CLIPVisionConfig(image_size=24, patch_size=4))
    img_id = tok.convert_tokens_to_ids("<image>")
    for split in ("train", "test"):
        ds = LLaVADataset(str(built[split]), built["image_folder"], tok, proc,
                          image_token_id=img_id, num_image_tokens=9)
        for i in range(min(len(ds), 6)):
            item = ds[i]
            assert item["pixel_values"].shape == (1, 3, 24, 24)
            assert tok.unk_token_id not in item["input_ids"]  # the vocabulary covers the data
            assert item["input_ids"].count(img_id) == 9
            labelled = [t for t in item["labels"] if t != -100]
            # every answer word, then </s>, per turn
            want = []
            for c in ds.records[i]["conversations"][1::2]:
                want += c["value"].split() + [tok.eos_token]
            assert tok.convert_ids_to_tokens(labelled) == want


def test_full_model_training_trains_tower_projector_and_llm(tmp_path):
    from models.mllm.data import TOY_WORDS, write_toy_dataset
    from models.mllm import tiny_components
    from models.mllm.train import train
    toy = write_toy_dataset(tmp_path / "toy", 8)
    comp = tiny_components(TOY_WORDS)
    from models.mllm import MLLM
    model = MLLM.build(**comp, projector="mlp2x_gelu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    res = train(dict(output_dir=str(tmp_path / "run"), data_path=str(toy),
                     image_folder=str(toy.parent / "images"), stage=2,
                     unfreeze_mm_vision_tower=True, per_device_train_batch_size=4,
                     max_steps=2, learning_rate=1e-3, disable_tqdm=True, use_cpu=True),
                model=model, on_step=seen.append)
    assert [r["step"] for r in seen] == [1, 2]
    assert [r["loss"] for r in seen] == res["losses"]
    keys = torch.load(f"{res['checkpoint']}/trainable.pt")
    for part in ("vision_tower.", "projector.", "llm."):
        assert any(k.startswith(part) for k in keys), part
    # the first trainable layers of all three parts changed
    for k in ("vision_tower.embeddings.patch_embedding.weight",
              "projector.mlp.0.weight", "llm.model.embed_tokens.weight"):
        assert not torch.equal(before[k], model.state_dict()[k]), k


def test_micro_run_writes_report(tmp_path):
    from models.digits.run import run_study
    out = tmp_path / "out"
    res = run_study("tiny", out)
    names = [r["projector"] for r in res["projectors"]]
    assert names == ["pargo", "qformer", "deco", "mlp2x_gelu"]
    toks = {r["projector"]: r["visual_tokens"] for r in res["projectors"]}
    assert toks == {"pargo": 10, "qformer": 10, "deco": 9, "mlp2x_gelu": 36}
    md = (out / "results.md").read_text()
    for s in ("| pargo | 10 |", "| mlp2x_gelu | 36 (all patches) |", "chance: uniform guess",
              "chance: majority answer", "relevance in asked cell"):
        assert s in md, s
    js = json.loads((out / "results.json").read_text())
    for r in js["projectors"]:
        assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
        assert set(r["accuracy"]) == set(dd.QTYPES)
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
        assert len(r["answers"]) == js["n_test_questions"] == 8 * len(dd.QTYPES)
        assert 0.0 <= r["relevance_in_cell"] <= 1.0
    for png in ("loss_curves.png", "accuracy.png", "relevance.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 150_000
    assert not list(out.glob("digits_*"))  # the work dir (data, checkpoints) is removed


# ------------------------------------------------------------------------------- relevance
def _proj(name, **kw):
    return build_projector(name, vision_width=16, llm_width=24, visual_grid=(6, 6), **kw).eval()


def test_probs_hook_sees_the_probabilities_and_is_removed():
    proj = _proj("pargo", n_partial=9, n_global=1, partial_grid=(3, 3), n_layers=2, hidden=32,
                 heads=4, intermediate=64, impl="reference")
    x = torch.randn(2, 36, 16)
    ref = proj(x)
    with capture_attention(proj) as rec:
        out = proj(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert [(i, k) for i, k, _ in rec] == [(0, "self"), (0, "cross"), (1, "self"), (1, "cross")]
    for _, kind, p in rec:
        assert p.shape == ((2, 4, 10, 10) if kind == "self" else (2, 4, 10, 36))
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    cross = proj.attention_patterns()["cross"][0]
    assert (rec[1][2][:, :, ~cross] == 0).all()  # masked-out patches get no probability
    assert all("probs_hook" not in vars(m) for m in proj.modules())


def _support(rel_patch):
    return rel_patch > 0


def test_relevance_of_one_output_token_stays_in_its_region():
    x = torch.randn(3, 36, 16)
    # MLP: output token j depends on patch j only
    rel = projector_relevance(_proj("mlp2x_gelu"), x, lambda o: o[:, 14].sum())
    assert rel["patch"].shape == (3, 36) and (rel["patch"] >= 0).all()
    assert (_support(rel["patch"]) == (torch.arange(36) == 14)).all()
    # DeCo 6x6 -> 3x3: pooled token 5 (row 1, col 2) is patches rows 2-3, cols 4-5
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[2:4, 4:6] = True
    rel = projector_relevance(_proj("deco", query_grid=(3, 3), impl="reference"), x,
                              lambda o: o[:, 5].sum())
    assert (_support(rel["patch"]) == region.reshape(-1)).all()
    # ParGo, one layer: partial query i reads its 2x2 window only (attention rollout)
    proj = _proj("pargo", n_partial=9, n_global=0, partial_grid=(3, 3), n_layers=1, hidden=32,
                 heads=4, intermediate=64)
    rel = projector_relevance(proj, x, lambda o: o[:, 5].sum())
    window = proj.attention_patterns()["cross"][0][5]
    assert torch.equal(window, region.reshape(-1))
    assert rel["per_query"].shape == (3, 9, 36) and (rel["per_query"] >= 0).all()
    assert (_support(rel["patch"]) <= window).all()
    assert (rel["patch"][:, window].sum(-1) > 0).all()
    assert torch.isfinite(rel["patch"]).all()


def test_qformer_relevance_finite_nonnegative():
    proj = _proj("qformer", n_query=10, n_layers=2, hidden=32, heads=4, intermediate=64)
    rel = projector_relevance(proj, torch.randn(2, 36, 16), lambda o: o[:, 0].sum())
    assert rel["patch"].shape == (2, 36) and rel["per_query"].shape == (2, 10, 36)
    assert torch.isfinite(rel["patch"]).all() and (rel["patch"] >= 0).all()
    assert (rel["patch"].sum(-1) > 0).all()
    assert proj.impl == "kernels"  # relevance forced the reference path, did not change impl


@pytest.mark.parametrize("name", ["pargo", "deco"])
def test_mllm_relevance_maps(name, built):
    from PIL import Image
    from models.digits.run import PROFILES, components, projector_kwargs
    from models.mllm import MLLM
    p = PROFILES["tiny"]
    comp = components(p, built["words"], built["image_size"])
    model = MLLM.build(comp["vision_tower"], comp["llm"], name, tokenizer=comp["tokenizer"],
                       image_processor=comp["image_processor"], vision_feature_layer=-1,
                       projector_kwargs=projector_kwargs(name, p, "reference"))
    test = [r for r in json.load(open(built["test"])) if r["qtype"] == "local"][:3]
    ims = [Image.open(built["image_folder"] / r["image"]).convert("RGB") for r in test]
    qs = [r["conversations"][0]["value"] for r in test]
    rel = mllm_relevance(model, ims, qs)
    assert rel["maps"].shape == (3, 6, 6) and rel["answer_ids"].shape == (3,)
    assert torch.isfinite(rel["maps"]).all() and (rel["maps"] >= 0).all()
    assert (rel["maps"].sum((1, 2)) > 0).all()
    assert all(p.grad is None for p in model.parameters())
    share = mass_in_cell(rel["maps"], [cell_of(q) for q in qs], (3, 3))
    assert ((share >= 0) & (share <= 1)).all()
    one = torch.zeros(1, 6, 6)
    one[0, 2, 5] = 1.0
    assert mass_in_cell(one, [(1, 2)], (3, 3)).item() == 1.0
