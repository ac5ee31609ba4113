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
    model, res = train_mllm(tw, comp, "pargo", projector_kwargs("pargo", p, "reference"),
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
    model2, _ = train_mllm(tw2, comp, "pargo", projector_kwargs("pargo", p, "reference"),
                           output_dir=tmp_path / "scratch", tune_vision_tower=True, **kw)
    k = "embeddings.patch_embedding.weight"
    assert not torch.equal(model2.vision_tower.state_dict()[k], before[k])


def _fake_run(proj, lr, seed, val, test, plateau=False, rel=None):
    return {"projector": proj, "lr": lr, "seed": seed, "visual_tokens": 10,
            "val_overall": val, "overall": test, "accuracy": {"cell": test, "read": test},
            "val": {"cell": val, "read": val}, "final_loss": 1.0 + lr, "plateau": plateau,
            "relevance_in_cell": rel, "relevance_baseline": 0.05, "train_s": 1.0}


def test_rate_is_selected_on_validation_never_on_test():
    from models.digits.run import select_lr, summarize
    v = np.random.default_rng().uniform(0.2, 0.8, 3)
    lrs = [1e-3, 2e-3, 4e-3]
    # test scores rank the rates in the opposite order of the validation scores
    runs = [_fake_run("deco", lr, 0, val, 1 - val) for lr, val in zip(lrs, v)]
    assert select_lr(runs, "deco", 0) == lrs[int(np.argmax(v))]
    runs += [_fake_run("deco", lr, 1, 0.9, 0.9) for lr in lrs if lr != lrs[int(np.argmax(v))]]
    s, = summarize(runs, ["deco"], [0, 1])
    assert s["lr"] == lrs[int(np.argmax(v))] and s["n_seeds"] == 1 and s["swept"] == lrs


def test_summary_and_table_report_mean_std_plateau_and_gated_relevance():
    from models.digits.run import results_table, summarize
    acc = np.random.default_rng().uniform(0.3, 0.9, 3)
    runs = [_fake_run("pargo", 2e-3, s, 0.5, a, plateau=(s == 2), rel=0.2 + 0.1 * s)
            for s, a in enumerate(acc)]
    runs += [_fake_run("qformer", 2e-3, s, 0.1, 0.1, plateau=True, rel=0.3) for s in range(3)]
    summ = summarize(runs, ["pargo", "qformer"], [0, 1, 2])
    m, sd = summ[0]["accuracy"]["cell"]
    assert m == pytest.approx(acc.mean()) and sd == pytest.approx(acc.std(ddof=1))
    chance = {t: {"uniform": 0.1, "majority": 0.15} for t in ("read", "cell")}
    md = results_table({"summary": summ, "chance": chance, "relevance_baseline": 0.05})
    row = next(ln for ln in md.splitlines() if ln.startswith("| pargo |"))
    assert f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f}" in row and "| 1/3 |" in row
    assert "0.300 ± 0.100" in row  # relevance: cell above chance -> reported
    q = next(ln for ln in md.splitlines() if ln.startswith("| qformer |"))
    assert "| 3/3 |" in q and "— (cell at chance)" in q and "0.300" not in q
    assert "| chance: majority answer |" in md and "0.050 (uniform map)" in md


def test_plateau_flag():
    from models.digits.run import on_plateau
    ch = {"cell": {"majority": 0.2}, "read": {"majority": 0.12}}
    assert on_plateau({"cell": 0.24, "read": 0.1}, ch)
    assert not on_plateau({"cell": 0.26, "read": 0.1}, ch)


def dd_projectors():
    from models.digits.run import PROJECTORS
    return list(PROJECTORS)


def test_micro_run_writes_report(tmp_path):
    from models.digits.run import run_study
    out = tmp_path / "out"
    res = run_study("tiny", out, overrides={"lrs": (1e-3, 3e-3), "seeds": (0, 1)})
    runs = [(r["projector"], r["lr"], r["seed"]) for r in res["runs"]]
    # first rate x both seeds, then the other rate; then seed 1 where validation chose 3e-3
    assert runs[:8] == [(n, 1e-3, s) for s in (0, 1) for n in dd_projectors()]
    assert runs[8:12] == [(n, 3e-3, 0) for n in dd_projectors()]
    picked = {s["projector"]: s["lr"] for s in res["summary"]}
    assert runs[12:] == [(n, 3e-3, 1) for n in dd_projectors() if picked[n] == 3e-3]
    toks = {r["projector"]: r["visual_tokens"] for r in res["runs"]}
    assert toks == {"pargo": 10, "qformer": 10, "deco": 9, "mlp2x_gelu": 36}
    md = (out / "results.md").read_text()
    for s in ("| pargo | 10 |", "| mlp2x_gelu | 36 (all patches) |", "chance: uniform guess",
              "chance: majority answer", "relevance in asked digit", "## All runs"):
        assert s in md, s
    js = json.loads((out / "results.json").read_text())
    assert js["complete"] and js["tower_stats"]["0"]["patch_acc"]["val"] >= 0
    for r in js["runs"]:
        assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
        assert set(r["accuracy"]) == set(r["val"]) == {"read", "row", "cell"}
        assert len(r["answers"]) == js["n_test_questions"] == 8 * 3
        assert 0.0 <= r["relevance_in_cell"] <= 1.0
    for s in js["summary"]:  # seed 1 ran at the rate chosen on seed 0's validation score
        assert s["n_seeds"] == 2 and s["seeds"] == [0, 1]
        best = max((r for r in js["runs"] if r["projector"] == s["projector"] and r["seed"] == 0),
                   key=lambda r: r["val_overall"])
        assert s["lr"] == best["lr"]
    for png in ("loss_curves.png", "accuracy.png", "relevance.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 150_000
    assert not list(out.glob("digits_*"))  # the work dir (data, checkpoints) is removed
    # the same runs split over two processes' folders merge back to the same summary
    from models.digits.run import merge_results
    for name, keep in (("a", lambda r: r["lr"] == 1e-3), ("b", lambda r: r["lr"] != 1e-3)):
        (tmp_path / name).mkdir()
        part = {**js, "runs": [r for r in js["runs"] if keep(r)]}
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert len(merged["runs"]) == len(js["runs"]) and merged["complete"]
    from models.digits.run import protocol_complete
    picked = {s["projector"]: s["lr"] for s in js["summary"]}
    for drop in (lambda r: r["seed"] == 0 and r["lr"] == 3e-3,  # a sweep run
                 lambda r: r["seed"] == 1 and r["lr"] == picked[r["projector"]]):  # a seed run
        i = next(k for k, r in enumerate(js["runs"]) if drop(r))
        rest = js["runs"][:i] + js["runs"][i + 1:]
        assert not protocol_complete(rest, dd_projectors(), [1e-3, 3e-3], [0, 1])
    assert json.loads(json.dumps(merged["summary"])) == js["summary"]
    summary_md, runs_md = (tmp_path / "m" / "results.md").read_text().split("## All runs")
    # the selected-rate table and the first-rate table, then one row per run
    assert summary_md.count("| pargo |") == 2 and runs_md.count("| pargo |") == 3
    assert "## Every projector at the sweep's first rate (0.001)" in summary_md


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
    model, _ = train_mllm(tw, comp, name, projector_kwargs(name, p, "reference"),
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
