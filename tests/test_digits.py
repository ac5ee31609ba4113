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
from models.digits.relevance import (box_coverage, capture_attention, cell_of,  # noqa: E402
                                     digit_box, mass_in_box, mllm_relevance,
                                     projector_relevance)


GRID, PITCH, PATCH = (4, 4), 9, 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return dd.build_digit_dataset(tmp_path_factory.mktemp("digits"), n_train=40, n_val=5,
                                  n_test=12, grid=GRID, pitch=PITCH)


def _expected(question: str, lab: np.ndarray) -> str:
    """Answers recomputed from the label grid, independently of the builder."""
    if question == "read the digits row by row .":
        return " ".join(str(d) for row in lab for d in row)
    if m := re.fullmatch(r"read row r(\d) \.", question):
        return " ".join(str(d) for d in lab[int(m[1]) - 1])
    if m := re.fullmatch(r"which digit is at r(\d)c(\d) \?", question):
        return str(lab[int(m[1]) - 1, int(m[2]) - 1])
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


def test_dataset_answers_and_pixels_come_from_the_offset_digits(built):
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    recs = {k: json.load(open(built[k])) for k in ("train", "val", "test")}
    assert len(recs["train"]) == 40 and len(recs["test"]) == 12 * len(dd.QTYPES)
    assert len(recs["val"]) == 5 * len(dd.QTYPES)
    seen_types, offsets = set(), []
    size = PITCH * GRID[0]
    for rec in recs["train"] + recs["val"] + recs["test"]:
        lab, idx = np.array(rec["labels"]), np.array(rec["digit_index"])
        off = np.array(rec["offsets"])
        assert lab.shape == GRID and (digits.target[idx] == lab).all()
        assert off.shape == (*GRID, 2) and off.min() >= 0 and off.max() <= PITCH - 8
        offsets += off.ravel().tolist()
        convs = rec["conversations"]
        assert convs[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in convs) == 1
        for h, g in zip(convs[::2], convs[1::2]):
            q = h["value"].removeprefix("<image>\n")
            assert g["value"] == _expected(q, lab), (q, lab)
        if "qtype" in rec:
            seen_types.add(rec["qtype"])
            assert rec["answer"] == convs[1]["value"]
        else:
            assert sorted(rec["qtypes"]) == sorted(dd.QTYPES) and len(convs) == 2 * len(dd.QTYPES)
        pix = np.asarray(Image.open(built["image_folder"] / rec["image"]))
        want = np.zeros((size, size))
        for (r, c), i in np.ndenumerate(idx):  # every digit at its own offset, rest black
            y, x = PITCH * r + off[r, c, 0], PITCH * c + off[r, c, 1]
            want[y:y + 8, x:x + 8] = digits.images[i] * 255 / 16
        np.testing.assert_allclose(pix, want, atol=0.5)
    assert seen_types == set(dd.QTYPES)
    # the offsets are random: both values occur, in roughly equal shares
    assert 0.3 < np.mean(offsets) < 0.7
    ch = built["chance"]
    test = recs["test"]
    assert ch["relation"]["uniform"] == 0.5 and ch["cell"]["uniform"] == 0.1
    assert ch["count"]["uniform"] == pytest.approx(1 / 17)
    cnt = [r["answer"] for r in test if r["qtype"] == "count"]
    assert ch["count"]["majority"] == max(cnt.count(a) for a in set(cnt)) / len(cnt)
    rows = [d for r in test if r["qtype"] == "row" for d in r["answer"].split()]
    assert len(rows) == 12 * 4 and ch["row"]["majority"] == max(map(rows.count, set(rows))) / 48
    assert set(built["chance_val"]) == set(dd.QTYPES)


def test_no_projector_window_lines_up_with_the_digits(built):
    """3x3 windows over the 36 px image are 12 px; the digits sit on a 9 px pitch: in every image
    all but the 4 corner digits straddle a window border, and every digit straddles a 6 px patch
    border; no window holds a digit cell (16 digits, 9 windows)."""
    size = PITCH * GRID[0]
    win, patch = size // 3, PATCH
    for rec in json.load(open(built["train"])):
        off = np.array(rec["offsets"])
        cross_win, cross_patch = [], []
        for r, c in np.ndindex(*GRID):
            y, x = PITCH * r + off[r, c, 0], PITCH * c + off[r, c, 1]
            if y // win != (y + 7) // win or x // win != (x + 7) // win:
                cross_win.append((r, c))
            if y // patch != (y + 7) // patch and x // patch != (x + 7) // patch:
                cross_patch.append((r, c))
        assert len(cross_win) == 12 and len(cross_patch) == 16, (cross_win, cross_patch)


def test_patch_labels_match_a_pixel_painting_oracle():
    rng = np.random.default_rng()
    for _ in range(20):
        grid = tuple(rng.integers(1, 5, 2))
        pitch = int(rng.integers(8, 12))
        lab = rng.integers(0, 10, grid)
        off = rng.integers(0, pitch - 7, (*grid, 2))
        h, w = pitch * grid[0], pitch * grid[1]
        patch = int(rng.choice([p for p in range(2, 9) if h % p == 0 and w % p == 0] or [1]))
        owner = np.full((h, w), -1)
        for r, c in np.ndindex(*grid):
            y, x = pitch * r + off[r, c, 0], pitch * c + off[r, c, 1]
            owner[y:y + 8, x:x + 8] = r * grid[1] + c
        want = np.empty((h // patch, w // patch), int)
        for i, j in np.ndindex(*want.shape):
            blk = owner[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].ravel()
            cnt = np.bincount(blk[blk >= 0], minlength=lab.size)
            want[i, j] = lab.ravel()[cnt.argmax()] if cnt.max() * 4 >= patch * patch else 10
        np.testing.assert_array_equal(dd.patch_labels(lab, off, pitch, patch), want)
    with pytest.raises(ValueError, match="patch"):
        dd.patch_labels(lab, off, pitch, h + 1)


def test_row_and_read_are_scored_per_digit_and_other_types_exactly():
    assert dd.score("read", "1 2 3 4 5 6 7 8 9", "1 2 3 4 5 6 7 8 9") == 1.0
    assert dd.score("read", "1 2 3 0 5 6 7 8", "1 2 3 4 5 6 7 8 9") == pytest.approx(7 / 9)
    assert dd.score("row", "1 0 3 4", "1 2 3 4") == pytest.approx(3 / 4)
    assert dd.score("read", "", "1 2 3 4 5 6 7 8 9") == 0.0
    assert dd.score("cell", "7", "7") == 1.0 and dd.score("cell", "7 7", "7") == 0.0


def test_qtypes_and_repeats_select_the_questions(tmp_path):
    b = dd.build_digit_dataset(tmp_path, n_train=6, n_test=4, qtypes=("read", "cell"),
                               train_repeats={"cell": 3})
    train, test = json.load(open(b["train"])), json.load(open(b["test"]))
    assert all(sorted(r["qtypes"]) == ["cell", "cell", "cell", "read"] for r in train)
    assert sorted({r["qtype"] for r in test}) == ["cell", "read"] and len(test) == 8
    assert set(b["chance"]) == {"cell", "read"} and "val" not in b


def test_train_val_test_use_disjoint_handwriting(built):
    idx = {k: {i for r in json.load(open(built[k])) for i in np.ravel(r["digit_index"])}
           for k in ("train", "val", "test")}
    assert idx["train"] and idx["val"] and idx["test"]
    assert max(idx["train"]) < min(idx["val"]) and max(idx["val"]) < min(idx["test"])
    assert sum(len(dd.digit_split(k)[1]) for k in ("train", "val", "test")) == 1797


def test_json_loads_through_the_trainer_dataset(built):
    from models.mllm.data import LLaVADataset
    from models.mllm import word_level_tokenizer
    from models.digits.run import PROFILES, components
    tok = word_level_tokenizer(built["words"])
    proc = components(PROFILES["tiny"], built["words"], built["image_size"])["image_processor"]
    img_id = tok.convert_tokens_to_ids("<image>")
    for split in ("train", "test"):
        ds = LLaVADataset(str(built[split]), built["image_folder"], tok, proc,
                          image_token_id=img_id, num_image_tokens=9)
        for i in range(min(len(ds), 6)):
            item = ds[i]
            assert item["pixel_values"].shape == (1, 3, 36, 36)  # [n_images, C, H, W]
            assert tok.unk_token_id not in item["input_ids"]  # the vocabulary covers the data
            assert item["input_ids"].count(img_id) == 9
            labelled = [t for t in item["labels"] if t != -100]
            want = []  # every answer word, then </s>, per turn
            for c in ds.records[i]["conversations"][1::2]:
                want += c["value"].split() + [tok.eos_token]
            assert tok.convert_ids_to_tokens(labelled) == want


def _study_windows(label, p):
    """Pixel boxes ``(y0, x0, y1, x1)`` of the windows of a study configuration (ParGo: its
    partial queries' cross-attention masks; DeCo: its pooling cells), on the profile's patch
    grid."""
    from models.digits.run import projector_kwargs, visual_grid
    name, kw = projector_kwargs(label, p, "reference")
    gh, gw = visual_grid(p)
    px = p["patch"]
    if name == "deco":
        s = kw["query_grid"][0]
        return [(i * gh // s * px, j * gw // s * px, (i + 1) * gh // s * px,
                 (j + 1) * gw // s * px) for i in range(s) for j in range(s)]
    proj = build_projector(name, vision_width=8, llm_width=8, visual_grid=(gh, gw), **kw)
    cross = proj.attention_patterns()["cross"][0][:kw["n_partial"]].reshape(-1, gh, gw)
    boxes = []
    for m in cross:
        ys, xs = np.nonzero(m.numpy())
        assert (m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]).all()  # a rectangle
        boxes.append((ys.min() * px, xs.min() * px, (ys.max() + 1) * px, (xs.max() + 1) * px))
    return boxes


def test_no_study_window_holds_a_digit_cell(built):
    """Every windowed configuration of the study (ParGo's partial windows, DeCo's pooling cells,
    at 9 and 36 tokens on the 12x12 grid of 3 px patches): at most 4 of an image's 16 digits fit
    inside one window (3x3 windows of 12 px: the corner digits; ParGo's 5x7 windows overlap, as
    the released rule makes them, and some are 9x9 px), none with DeCo's 6 px cells.
    A 2x4 ParGo layout (9 px wide windows, one per digit column) would hold every digit: the
    reason the 9-token ParGo has 3x3 windows and no global query."""
    from models.digits.run import PROFILES
    p = PROFILES["cpu-study"]
    recs = json.load(open(built["train"]))

    def held(boxes, rec):
        off = np.array(rec["offsets"])
        n = 0
        for r, c in np.ndindex(*GRID):
            y, x = PITCH * r + off[r, c, 0], PITCH * c + off[r, c, 1]
            n += any(y0 <= y and y + 8 <= y1 and x0 <= x and x + 8 <= x1
                     for y0, x0, y1, x1 in boxes)
        return n
    windowed = [c for c in p["configs"] if c.startswith(("pargo", "deco"))]
    assert len(windowed) == 4
    for label in windowed:
        boxes = _study_windows(label, p)
        most = max(held(boxes, rec) for rec in recs)
        assert most <= (0 if label == "deco-36" else 4), (label, most)
    aligned = _study_windows("pargo-9", {**p, "pargo_layouts": {9: ((2, 4), 1)}})
    assert min(held(aligned, rec) for rec in recs) == 16


# ---------------------------------------------------------------------- tower and protocol
@pytest.fixture(scope="module")
def tower(built):
    from models.digits.run import PROFILES, components
    from models.digits.tower import pretrain_tower
    p = PROFILES["tiny"]
    comp = components(p, built["words"], built["image_size"])
    tw, stats = pretrain_tower(comp["vision_tower"], comp["image_processor"], built, steps=4,
                               batch=8, lr=1e-3, seed=0, patch=p["patch"])
    return tw, stats, comp


def test_pretrained_tower_is_frozen_and_stays_frozen_in_mllm_training(tower, built, tmp_path):
    from models.digits.run import PROFILES, projector_kwargs, train_mllm
    tw, stats, comp = tower
    assert len(stats["losses"]) == 4 and all(np.isfinite(stats["losses"]))
    assert 0 <= stats["patch_acc"]["train"] <= 1 and 0 <= stats["patch_acc"]["val"] <= 1
    assert not any(q.requires_grad for q in tw.parameters()) and not tw.training
    before = {k: v.clone() for k, v in tw.state_dict().items()}
    p = PROFILES["tiny"]
    kw = dict(data_path=built["train"], image_folder=built["image_folder"], steps=2, batch=4,
              lr=1e-2, seed=0, warmup_ratio=0.0, weight_decay=0.0)
    snap = {}

    def init(m):  # the projector and LLM as training starts
        snap.update({k: v.clone() for k, v in m.state_dict().items()
                     if k.startswith(("projector.", "llm."))})
    model, res = train_mllm(tw, comp, *projector_kwargs("pargo-9", p, "reference"),
                            output_dir=tmp_path / "frozen", tune_vision_tower=False, init=init,
                            **kw)
    assert len(res["losses"]) == 2
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical after projector training
    after = model.state_dict()
    for k in ("projector.queries", "llm.model.embed_tokens.weight"):
        assert not torch.equal(after[k], snap[k]), k  # ... while projector and LLM trained
    # the from-scratch flag trains the tower too
    import copy
    tw2 = copy.deepcopy(tw).requires_grad_(True)
    model2, _ = train_mllm(tw2, comp, *projector_kwargs("pargo-9", p, "reference"),
                           output_dir=tmp_path / "scratch", tune_vision_tower=True, **kw)
    k = "embeddings.patch_embedding.weight"
    assert not torch.equal(model2.vision_tower.state_dict()[k], before[k])


def test_aligned_protocol_stage1_trains_the_projector_against_the_frozen_text_lm(
        tower, built, tmp_path):
    """The papers' recipe as the study runs it: the LM trained on the text side, stage 1 moves
    only the projector (LM and tower bit-identical), stage 2 moves projector and LM."""
    import copy
    from models.digits.run import (PROFILES, build_mllm, pretrain_lm, projector_kwargs,
                                   text_only, train_stage)
    tw, _, comp = tower
    p = {**PROFILES["tiny"], "lm_steps": 2, "lm_lr": 1e-2}
    recs = json.load(open(built["train"]))
    text = text_only(recs)
    assert len(text) == len(recs) and all("image" not in r for r in text)
    for r, t in zip(recs, text):  # the same turns, without the placeholder
        assert [x["value"] for x in t["conversations"]] == [
            x["value"].removeprefix("<image>\n") for x in r["conversations"]]
        assert "<image>" not in json.dumps(t)
    lm_state, st = pretrain_lm(tw, comp, built, tmp_path, p, seed=0)
    assert len(st["losses"]) == 2
    fresh = build_mllm(copy.deepcopy(tw), comp, "mlp2x_gelu", {}, seed=0)
    k = "model.embed_tokens.weight"
    assert not torch.equal(lm_state[k], fresh.llm.state_dict()[k])  # the LM did train
    model = build_mllm(copy.deepcopy(tw), comp, *projector_kwargs("deco-9", p, "reference"),
                       seed=0)
    model.llm.load_state_dict(lm_state)
    snap = {n: v.clone() for n, v in model.state_dict().items()}
    kw = dict(data_path=built["train"], image_folder=built["image_folder"], steps=2, batch=4,
              lr=1e-2, seed=0, warmup_ratio=0.0, weight_decay=0.0)
    train_stage(model, stage=1, output_dir=tmp_path / "s1", **kw)
    s1 = {n: v.clone() for n, v in model.state_dict().items()}
    for n, v in s1.items():
        moved = not torch.equal(v, snap[n])
        assert moved == n.startswith("projector."), n
    train_stage(model, stage=2, output_dir=tmp_path / "s2", **kw)
    for n, v in model.state_dict().items():
        if n.startswith("llm.") and n.endswith("embed_tokens.weight"):
            assert not torch.equal(v, s1[n])
        if n.startswith("vision_tower."):
            assert torch.equal(v, snap[n])


def test_image_dependence_is_the_between_image_variance_share():
    from models.digits.run import image_dependence

    class Fake:
        def __init__(self, y):
            self.y, self.projector = y, torch.nn.Linear(1, 1)

        def encode_images(self, pix):
            return self.y
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    n, t, c = 7, 5, 3
    token = torch.randn(1, t, c, generator=g, dtype=torch.float64)
    image = torch.randn(n, t, c, generator=g, dtype=torch.float64)
    image = image - image.mean(0, keepdim=True)
    pix = torch.zeros(n, 3, 2, 2)
    assert image_dependence(Fake(token.expand(n, t, c)), pix) == pytest.approx(0.0, abs=1e-12)
    only = image - image.mean((0, 1), keepdim=True)  # no token structure at all
    assert image_dependence(Fake(only), pix) == pytest.approx(1.0)
    y = token + 0.3 * image
    # independent: per channel, between-image sum of squares over the total around the
    # channel mean, by explicit loops
    yn = y.numpy()
    between = sum((yn[i, j, k] - yn[:, j, k].mean()) ** 2
                  for i in range(n) for j in range(t) for k in range(c))
    total = sum((yn[i, j, k] - yn[:, :, k].mean()) ** 2
                for i in range(n) for j in range(t) for k in range(c))
    assert image_dependence(Fake(y), pix) == pytest.approx(between / total, rel=1e-6)


def _fake_run(cfg, lr, seed, val, test, plateau=False, rel=None, protocol="aligned"):
    return {"config": cfg, "projector": cfg.split("-")[0], "protocol": protocol, "lr": lr,
            "seed": seed, "visual_tokens": int(cfg.split("-")[1]), "val_overall": val,
            "overall": test, "accuracy": {"cell": test, "read": test},
            "val": {"cell": val, "read": val}, "final_loss": 1.0 + lr, "plateau": plateau,
            "relevance_in_cell": rel, "relevance_baseline": 0.05, "train_s": 1.0,
            "image_dependence": {"init": 0.1, "final": 0.5},
            "val_curve": [[100, val - 0.1, {}], [200, val, {}]]}


def test_rate_is_selected_on_validation_never_on_test():
    from models.digits.run import select_lr, summarize
    v = np.random.default_rng().uniform(0.2, 0.8, 3)
    lrs = [1e-3, 2e-3, 4e-3]
    # test scores rank the rates in the opposite order of the validation scores
    runs = [_fake_run("deco-9", lr, 0, val, 1 - val) for lr, val in zip(lrs, v)]
    # another protocol's runs of the same configuration play no part
    runs += [_fake_run("deco-9", lr, 0, 1 - val, val, protocol="joint")
             for lr, val in zip(lrs, v)]
    assert select_lr(runs, "deco-9", 0) == lrs[int(np.argmax(v))]
    assert select_lr(runs, "deco-9", 0, "joint") == lrs[int(np.argmin(v))]
    runs += [_fake_run("deco-9", lr, 1, 0.9, 0.9) for lr in lrs if lr != lrs[int(np.argmax(v))]]
    s, = summarize(runs, [0, 1], "aligned")
    assert s["lr"] == lrs[int(np.argmax(v))] and s["n_seeds"] == 1 and s["swept"] == lrs
    assert s["inside"] == (int(np.argmax(v)) == 1)


def test_rate_grid_widens_until_the_kept_rate_is_inside():
    from models.digits.run import rates_to_run
    grid = (1e-3, 2e-3, 4e-3)

    def todo(vals, max_widen=3):
        runs = [_fake_run("pargo-9", lr, 0, v, 0.0) for lr, v in vals.items()]
        return rates_to_run(runs, "pargo-9", "aligned", grid, 0, 2.0, max_widen)
    assert todo({1e-3: 0.3}) == [2e-3, 4e-3]  # the grid first
    assert todo({1e-3: 0.3, 2e-3: 0.5, 4e-3: 0.4}) == []  # inside: done
    assert todo({1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3}) == [5e-4]  # lower edge: one below
    assert todo({5e-4: 0.6, 1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3}) == [2.5e-4]
    assert todo({5e-4: 0.4, 1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3}) == []
    assert todo({1e-3: 0.3, 2e-3: 0.4, 4e-3: 0.5}) == [8e-3]  # upper edge: one above
    assert todo({1e-3: 0.3, 2e-3: 0.4, 4e-3: 0.5}, max_widen=0) == []
    # at most max_widen rates beyond the grid
    assert todo({2.5e-4: 0.7, 5e-4: 0.6, 1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3}, max_widen=2) == []
    # a tie goes to the smaller rate, so an equal-valued lower edge widens
    assert todo({1e-3: 0.5, 2e-3: 0.5, 4e-3: 0.3}) == [5e-4]


def test_summary_and_table_report_mean_std_plateau_and_gated_relevance():
    from models.digits.run import results_table, summarize
    acc = np.random.default_rng().uniform(0.3, 0.9, 3)
    runs = [_fake_run("pargo-9", 2e-3, s, 0.5, a, plateau=(s == 2), rel=0.2 + 0.1 * s)
            for s, a in enumerate(acc)]
    runs += [_fake_run("qformer-9", 2e-3, s, 0.1, 0.1, plateau=True, rel=0.3) for s in range(3)]
    summ = summarize(runs, [0, 1, 2])
    m, sd = summ[0]["accuracy"]["cell"]
    assert m == pytest.approx(acc.mean()) and sd == pytest.approx(acc.std(ddof=1))
    chance = {t: {"uniform": 0.1, "majority": 0.15} for t in ("read", "cell")}
    md = results_table({"chance": chance, "relevance_baseline": 0.05}, summ)
    row = next(ln for ln in md.splitlines() if ln.startswith("| pargo-9 |"))
    assert f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f}" in row and "| 1/3 |" in row
    assert "0.300 ± 0.100" in row  # relevance: cell above chance -> reported
    assert "0.10 → 0.50" in row  # image dependence
    q = next(ln for ln in md.splitlines() if ln.startswith("| qformer-9 |"))
    assert "| 3/3 |" in q and "— (cell at chance)" in q and "0.300" not in q
    assert "| chance: majority answer |" in md and "0.050 (uniform map)" in md


def test_plateau_flag():
    from models.digits.run import on_plateau
    ch = {"cell": {"majority": 0.2}, "read": {"majority": 0.12}}
    assert on_plateau({"cell": 0.24, "read": 0.1}, ch)
    assert not on_plateau({"cell": 0.26, "read": 0.1}, ch)


_MICRO = {"seeds": (0, 1),
          "protocols": {"aligned": ("pargo-9", "mlp-36"), "joint": ("deco-9",)},
          "lrs": {"aligned": {"pargo-9": (1e-3, 3e-3), "mlp-36": (1e-3,)},
                  "joint": {"deco-9": (2e-3,)}}}


def test_micro_run_writes_report(tmp_path):
    """Both protocols end to end on the tiny profile (stage 1 + 2 and joint), the grid then the
    seeds, the report, the plots and the merge of split runs."""
    from models.digits.run import merge_results, protocol_complete, run_key, run_study
    out = tmp_path / "out"
    res = run_study("tiny", out, overrides=_MICRO)
    runs = [(r["config"], r["protocol"], r["lr"], r["seed"]) for r in res["runs"]]
    picked = {(s["config"], s["protocol"]): s["lr"] for s in res["summary"]}
    assert runs == [("pargo-9", "aligned", 1e-3, 0), ("pargo-9", "aligned", 3e-3, 0),
                    ("pargo-9", "aligned", picked["pargo-9", "aligned"], 1),
                    ("mlp-36", "aligned", 1e-3, 0), ("mlp-36", "aligned", 1e-3, 1),
                    ("deco-9", "joint", 2e-3, 0), ("deco-9", "joint", 2e-3, 1)]
    toks = {r["config"]: r["visual_tokens"] for r in res["runs"]}
    assert toks == {"pargo-9": 9, "mlp-36": 36, "deco-9": 9}
    md = (out / "results.md").read_text()
    for s in ("## Protocol `aligned`", "## Protocol `joint`", "| pargo-9 | 9 |",
              "| mlp-36 | 36 (all patches) |", "chance: uniform guess", "chance: majority answer",
              "relevance in asked digit", "## All runs", "image dependence"):
        assert s in md, s
    js = json.loads((out / "results.json").read_text())
    assert js["complete"] and js["tower_stats"]["0"]["patch_acc"]["val"] >= 0
    assert set(js["lm_stats"]) == {"0", "1"} and js["platform"]["cpu"]
    for r in js["runs"]:
        aligned = r["protocol"] == "aligned"
        # aligned: 2 stage-1 steps then 3 stage-2 steps; joint: the same 5 steps in one stage
        assert len(r["losses_stage1"]) == (2 if aligned else 0)
        assert len(r["losses"]) == (3 if aligned else 5)
        assert all(np.isfinite(r["losses_stage1"] + r["losses"]))
        assert [v[0] for v in r["val_curve"]] == ([2, 3] if aligned else [2, 4, 5])
        assert r["val_overall"] == r["val_curve"][-1][1]
        assert set(r["accuracy"]) == set(r["val"]) == {"read", "row", "cell"}
        assert len(r["answers"]) == js["n_test_questions"] == 8 * 3
        assert 0.0 <= r["relevance_in_cell"] <= 1.0
        dep = r["image_dependence"]
        assert set(dep) == ({"init", "stage1", "final"} if aligned else {"init", "final"})
        assert all(0.0 <= v <= 1.0 for v in dep.values())
    for s in js["summary"]:  # seed 1 ran at the rate chosen on seed 0's validation score
        assert s["n_seeds"] == 2 and s["seeds"] == [0, 1]
        best = max((r for r in js["runs"] if r["config"] == s["config"]
                    and r["protocol"] == s["protocol"] and r["seed"] == 0),
                   key=lambda r: (r["val_overall"], -r["lr"]))
        assert s["lr"] == best["lr"]
    for png in ("loss_curves.png", "val_curves.png", "accuracy.png", "relevance.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 200_000
    assert not list(out.glob("digits_*"))  # the work dir (data, checkpoints) is removed
    # the same runs split over two processes' folders (one per protocol) merge back
    for name, prot in (("a", "aligned"), ("b", "joint")):
        (tmp_path / name).mkdir()
        ps = {**js["profile_settings"], "protocols": {prot: js["profile_settings"]["protocols"][prot]}}
        part = {**js, "profile_settings": ps, "runs": [r for r in js["runs"] if r["protocol"] == prot]}
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert len(merged["runs"]) == len(js["runs"]) and merged["complete"]
    assert json.loads(json.dumps(merged["summary"])) == js["summary"]
    p = js["profile_settings"]
    for drop in (lambda r: r["seed"] == 0 and r["lr"] == 3e-3,  # a grid run
                 lambda r: r["seed"] == 1 and r["config"] == "deco-9"):  # a seed run
        i = next(k for k, r in enumerate(js["runs"]) if drop(r))
        assert not protocol_complete(js["runs"][:i] + js["runs"][i + 1:], p)
    md = (tmp_path / "m" / "results.md").read_text()
    summary_md, runs_md = md.split("## All runs")
    assert summary_md.count("| pargo-9 |") == 1 and runs_md.count("| pargo-9 |") == 3
    # an interrupted run resumed: the kept runs are not rerun, the missing one is, identically
    from models.digits.run import compare_results
    cut = {**js, "runs": js["runs"][:-1], "complete": False}
    (out / "results.json").write_text(json.dumps(cut))
    again = run_study("tiny", out, overrides=_MICRO, resume=True)
    assert [run_key(r) for r in again["runs"]] == [run_key(r) for r in js["runs"]]
    assert again["runs"][0]["cpu_s"] == js["runs"][0]["cpu_s"]  # kept, not rerun
    assert compare_results(again, js) == [] and again["complete"] and again["sessions"] == 2


def test_aligned_runs_start_stage1_from_the_cached_text_lm(tmp_path, monkeypatch):
    """In the aligned protocol stage 1 starts from the text-pretrained LM of the run's seed (the
    one saved in the cache), stage 2 from stage 1's projector; the joint protocol from a fresh
    LM."""
    import models.digits.run as run
    seen = []
    real = run.train_stage

    def spy(model, **kw):
        seen.append((kw["stage"], {k: v.clone() for k, v in model.llm.state_dict().items()},
                     {k: v.clone() for k, v in model.projector.state_dict().items()}))
        out = real(model, **kw)
        seen[-1] += ({k: v.clone() for k, v in model.projector.state_dict().items()},)
        return out
    monkeypatch.setattr(run, "train_stage", spy)
    over = {"protocols": {"aligned": ("deco-9",), "joint": ("deco-9",)},
            "lrs": {"aligned": {"deco-9": (1e-3,)}, "joint": {"deco-9": (1e-3,)}},
            "steps": 2, "s1_steps": 2, "lm_steps": 2, "eval_every": 0, "n_relevance_score": 0,
            "n_relevance": 0}
    run.run_study("tiny", tmp_path / "out", overrides=over, cache=tmp_path / "cache")
    lm_file, = (tmp_path / "cache").glob("lm_*_s0.pt")
    lm = torch.load(lm_file, weights_only=False)["state"]
    text_lm, s1, s2, joint = seen  # the LM pretraining, stage 1, stage 2, the joint run
    assert [x[0] for x in seen] == [2, 1, 2, 2]
    for k, v in lm.items():
        assert torch.equal(s1[1][k], v), k  # stage 1 starts from the cached text LM
        assert torch.equal(s2[1][k], v), k  # ... which stage 1 leaves alone
    for k, v in s1[3].items():
        assert torch.equal(s2[2][k], v), k  # stage 2 continues stage 1's projector
    assert not all(torch.equal(s1[2][k], v) for k, v in s1[3].items())  # which moved
    k = "model.embed_tokens.weight"
    assert not torch.equal(joint[1][k], lm[k])  # the joint run starts from a fresh LM


def test_same_seed_gives_bit_identical_losses_and_answers(tmp_path):
    """Reproducibility: the tiny profile (tower, text LM, stage 1, stage 2, evaluation) run in
    this process and again in a fresh interpreter with another hash seed gives bit-identical
    losses, validation curves and answers (`--check`); another seed does not."""
    import os
    import subprocess
    import sys
    from models.digits.run import compare_results, run_study
    kw = dict(configs=["qformer-9"], overrides={"steps": 4, "s1_steps": 3, "eval_every": 2})
    ref = run_study("tiny", tmp_path / "a", **kw)
    env = {**os.environ, "PYTHONHASHSEED": str(np.random.default_rng().integers(1, 1 << 30)),
           "OMP_NUM_THREADS": "1"}
    # the same profile through the CLI's --check in a fresh interpreter
    code = ("import sys; from models.digits.run import check, PROFILES; "
            "sys.exit(0 if check('tiny', sys.argv[1], sys.argv[2], configs=['qformer-9'], "
            "overrides={'steps': 4, 's1_steps': 3, 'eval_every': 2}) else 1)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reproduced bit for bit" in proc.stdout
    new = json.loads((tmp_path / "b" / "results.json").read_text())
    r0, r1 = ref["runs"][0], new["runs"][0]
    assert len(r0["losses"]) == 4 and len(r0["losses_stage1"]) == 3
    assert r0["losses"] == r1["losses"] and r0["answers"] == r1["answers"]
    # the comparison can fail: another seed (tower, LM, projector, data order) differs
    other = run_study("tiny", tmp_path / "c", **{**kw, "overrides": {**kw["overrides"],
                                                                     "seeds": (1,)}})
    other["runs"][0]["seed"] = 0
    diffs = compare_results(other, {**ref, "tower_stats": {}, "lm_stats": {}})
    assert any("losses differs" in d for d in diffs), diffs


def test_budget_rule_is_the_latest_knee_of_the_pilot_curves():
    from models.digits.run import budget_from_pilot, knee_step
    rng = np.random.default_rng()
    k = int(rng.integers(3, 15))
    # rises linearly to a plateau at step 100 * k, then small noise below 0.005
    curve = [[100 * i, min(i, k) / k * 0.5 + rng.uniform(0, 0.005), {}] for i in range(1, 25)]
    # the 3-point moving average gets within 0.02 of the top once it has risen to 0.48
    sm = [np.mean([c[1] for c in curve[max(0, i - 2):i + 1]]) for i in range(len(curve))]
    want = next(c[0] for c, v in zip(curve, sm) if v >= max(sm) - 0.02)
    assert knee_step(curve) == want and 100 * (k - 1) <= want <= 100 * (k + 2)
    flat = [[100 * i, 0.3, {}] for i in range(1, 10)]
    assert knee_step(flat) == 100 and knee_step([]) is None
    runs = [{"config": "a", "val_curve": curve}, {"config": "b", "val_curve": flat},
            {"config": "c", "val_curve": []}]
    budget, knees = budget_from_pilot(runs)
    assert knees == {"a": want, "b": 100}
    assert budget == -(-want // 200) * 200 and budget % 200 == 0 and budget >= want


def test_compare_results_names_the_first_difference():
    from models.digits.run import compare_results
    r = _fake_run("deco-9", 1e-3, 0, 0.5, 0.5)
    rng = np.random.default_rng()
    r.update(losses=rng.uniform(1, 5, 6).tolist(), losses_stage1=[], answers=["1 2", "3"])
    ref = {"runs": [r], "tower_stats": {"0": {"losses": [1.0, 0.5]}}}
    same = json.loads(json.dumps(ref))
    assert compare_results(same, ref) == []
    i = int(rng.integers(6))
    bumped = json.loads(json.dumps(ref))
    bumped["runs"][0]["losses"][i] = float(np.nextafter(r["losses"][i], 10.0))  # one ulp
    d, = compare_results(bumped, ref)
    assert f"losses differs (first at index {i}" in d
    moved = json.loads(json.dumps(ref))
    moved["runs"][0]["answers"][1] = "4"
    assert compare_results(moved, ref) == ["run ('deco-9', 'aligned', 0.001, 0): answers differs "
                                           "(first at index 1: '4' vs '3')"]
    tw = json.loads(json.dumps(ref))
    tw["tower_stats"]["0"]["losses"][1] = 0.25
    assert compare_results(tw, ref) == ["tower_stats seed 0: pretraining losses differ"]
    assert compare_results({"runs": []}, ref)[-1].startswith("run ('deco-9'")


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
def test_mllm_relevance_maps(name, built, tower):
    from PIL import Image
    from models.digits.run import PROFILES, projector_kwargs, train_mllm
    p = PROFILES["tiny"]
    tw, _, comp = tower
    model, _ = train_mllm(tw, comp, *projector_kwargs(f"{name}-9", p, "reference"),
                          data_path=built["train"], image_folder=built["image_folder"],
                          output_dir=built["image_folder"].parent / f"rel_{name}", steps=1,
                          batch=4, lr=1e-3, seed=0, warmup_ratio=0.0, weight_decay=0.0,
                          tune_vision_tower=False)
    test = [r for r in json.load(open(built["test"])) if r["qtype"] == "cell"][:3]
    ims = [Image.open(built["image_folder"] / r["image"]).convert("RGB") for r in test]
    qs = [r["conversations"][0]["value"] for r in test]
    rel = mllm_relevance(model, ims, qs)
    assert rel["maps"].shape == (3, 6, 6) and rel["answer_ids"].shape == (3,)
    assert torch.isfinite(rel["maps"]).all() and (rel["maps"] >= 0).all()
    assert (rel["maps"].sum((1, 2)) > 0).all()
    assert all(p.grad is None for p in model.parameters())
    share = mass_in_box(rel["maps"], [digit_box(r, cell_of(q)) for r, q in zip(test, qs)])
    assert ((share >= 0) & (share <= 1)).all()


def test_digit_box_and_coverage_against_pixel_counts():
    rng = np.random.default_rng()
    for _ in range(10):
        r, c = (int(x) for x in rng.integers(0, 4, 2))
        off = rng.integers(0, 2, (4, 4, 2))
        rec = {"labels": np.zeros((4, 4), int).tolist(), "offsets": off.tolist(), "pitch": 9}
        box = digit_box(rec, (r, c))
        px = np.zeros((36, 36))
        y, x = 9 * r + off[r, c, 0], 9 * c + off[r, c, 1]
        px[y:y + 8, x:x + 8] = 1
        want = px.reshape(6, 6, 6, 6).mean((1, 3))  # covered share of each 6x6 patch
        torch.testing.assert_close(box_coverage(box, (6, 6)), torch.as_tensor(want),
                                   rtol=0, atol=1e-9)
        m = torch.as_tensor(rng.uniform(0.1, 1.0, (1, 6, 6)))
        share = mass_in_box(m, [box])
        assert share.item() == pytest.approx(float((m[0].numpy() * want).sum() / m.sum()))
    assert cell_of("which digit is at r3c2 ?") == (2, 1)
    assert cell_of("which digit is in row 1 , column 4 ?") == (0, 3)
    with pytest.raises(ValueError, match="cell"):
        cell_of("read row r2 .")


def test_committed_study_and_make_run_tables_are_of_the_current_profiles():
    """The committed tables are what this code runs: the study (`cpu-study`) was run with the
    current settings, is complete, every kept rate lies strictly inside its grid with 3 seeds;
    `run._CHOSEN` is the study's choice on validation for every (configuration, protocol); `make
    run` (`cpu`, rates from `_CHOSEN`) was run with the current settings (so `--check
    benchmarks/results/digits_cpu_seed0` reruns exactly that table)."""
    from pathlib import Path

    from models.digits.run import _CHOSEN, PROFILES, _select
    res = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    study = json.loads((res / "digits_cpu_study" / "results.json").read_text())
    want = json.loads(json.dumps(_select(PROFILES["cpu-study"])))
    got = study["profile_settings"]
    assert study["profile"] == "cpu-study" and study["complete"]
    assert {k: v for k, v in got.items() if k not in ("protocols", "configs")} == \
        {k: v for k, v in want.items() if k not in ("protocols", "configs")}
    assert {pr: sorted(cs) for pr, cs in got["protocols"].items()} == \
        {pr: sorted(cs) for pr, cs in want["protocols"].items()}
    chosen = {}
    for s in study["summary"]:
        assert s["inside"] and s["n_seeds"] == len(want["seeds"]), s["config"]
        chosen[(s["config"], s["protocol"])] = s["lr"]
    assert set(chosen) == {(c, pr) for pr, cs in want["protocols"].items() for c in cs}
    assert chosen == {(c, pr): lr for pr, rates in _CHOSEN.items() for c, lr in rates.items()}
    quick = json.loads((res / "digits_cpu_seed0" / "results.json").read_text())
    assert quick["profile"] == "cpu" and quick["complete"]
    assert quick["profile_settings"] == json.loads(json.dumps(_select(PROFILES["cpu"])))
    assert {(r["config"], r["protocol"], r["lr"]) for r in quick["runs"]} == \
        {(c, pr, lr) for pr, rates in PROFILES["cpu"]["lrs"].items() for c, (lr,) in rates.items()}
