"""MME scoring against hand-computed values, and the runner (fake and tiny real model)."""
import json

import numpy as np
import pytest
from PIL import Image

from models.mllm.eval_mme import (main, parse_prediction, read_dir, run_mme, score_category,
                             score_mme, score_results_dir)

ROWS = {
    # a: both right; b: first wrong; c: "I think no" parses as other -> wrong
    "existence": [("a.png", "q1", "Yes", "Yes"), ("a.png", "q2", "No", "No, there is not"),
                  ("b.png", "q1", "Yes", "no"), ("b.png", "q2", "No", "no"),
                  ("c.png", "q1", "Yes", "yes."), ("c.png", "q2", "No", "I think no")],
    "code_reasoning": [("x.png", "q1", "Yes", " YES "), ("x.png", "q2", "No", "No")],
    # "Not sure" starts with "no" -> no (as the MME toolkit parses it)
    "count": [("y.png", "q1", "Yes", "Not sure"), ("y.png", "q2", "No", "Yes")],
}


def test_parse_prediction_follows_the_toolkit():
    assert [parse_prediction(p) for p in ["Yes", " NO\n", "yes, it is", "nope", "Maybe",
                                          "It is yes", ""]] == \
        ["yes", "no", "yes", "no", "other", "other", "other"]


def test_scores_match_hand_computed_values():
    s = score_mme(ROWS)
    ex = s["categories"]["existence"]
    assert ex["acc"] == pytest.approx(400 / 6) and ex["acc_plus"] == pytest.approx(100 / 3)
    assert ex["score"] == pytest.approx(100.0) and (ex["questions"], ex["images"]) == (6, 3)
    assert s["categories"]["code_reasoning"]["score"] == 200.0
    assert s["categories"]["count"]["score"] == 0.0
    assert s["perception"] == pytest.approx(100.0) and s["cognition"] == 200.0
    assert s["total"] == pytest.approx(300.0)


def test_scoring_rejects_bad_rows():
    with pytest.raises(ValueError, match="Yes or No"):
        score_category([("a", "q", "maybe", "yes")])
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        score_category([("a", "q", "yes")])
    with pytest.raises(ValueError, match="empty"):
        score_category([])


def _write_mme(tmp_path, rng):
    qdir, root = tmp_path / "questions", tmp_path / "images"
    truth = {}
    for cat, layout in (("color", "images"), ("OCR", "")):
        d = root / cat / layout if layout else root / cat
        d.mkdir(parents=True)
        lines = []
        for i in range(3):
            name = f"{cat}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(d / name)
            lines += [f"{name}\tIs it {cat} {i}?\tYes\n", f"{name}\tIs it not {i}?\tNo\n"]
        qdir.mkdir(exist_ok=True)
        (qdir / f"{cat}.txt").write_text("".join(lines))
        truth[cat] = lines
    return qdir, root


class _FakeModel:
    """Answers "Yes" unless the question contains "not"; image 0 of each category is answered
    wrongly on its first question. Records the batch sizes it saw."""

    def __init__(self):
        self.batches = []

    def eval(self):
        return self

    def chat(self, images, questions, template, max_new_tokens):
        self.batches.append(len(images))
        assert all(im.size == (30, 30) for im in images)
        return ["No" if (" 0?" in q and "not" not in q) else
                ("No" if "not" in q else "Yes, it is") for q in questions]


def test_runner_writes_toolkit_files_and_scores(tmp_path):
    qdir, root = _write_mme(tmp_path, np.random.default_rng(0))
    fake = _FakeModel()
    s = run_mme(fake, qdir, root, tmp_path / "res", batch_size=4)
    assert sorted(fake.batches) == [2, 2, 4, 4]
    for cat in ("color", "OCR"):
        c = s["categories"][cat]
        assert c["acc"] == pytest.approx(500 / 6) and c["acc_plus"] == pytest.approx(200 / 3)
    assert s["perception"] == pytest.approx(2 * (500 / 6 + 200 / 3)) and s["cognition"] == 0
    assert score_results_dir(tmp_path / "res") == s
    assert all(len(r) == 4 for rows in read_dir(tmp_path / "res", True).values() for r in rows)


def test_cli_score_only(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    for cat, rows in ROWS.items():
        (res / f"{cat}.txt").write_text("".join("\t".join(r) + "\n" for r in rows))
    main(["--score_only", "--results_dir", str(res), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == pytest.approx(300.0)
    with pytest.raises(ValueError, match="4 tab-separated"):
        (res / "bad.txt").write_text("a.png\tq\tYes\n")
        score_results_dir(res)


def test_runner_with_a_tiny_mllm(tmp_path):
    pytest.importorskip("transformers")
    import torch

    from models.mllm.data import TOY_WORDS
    from models.mllm import MLLM, tiny_components
    torch.manual_seed(0)
    model = MLLM.build(**tiny_components(TOY_WORDS), projector="mlp2x_gelu")
    qdir, root = _write_mme(tmp_path, np.random.default_rng(1))
    s = run_mme(model, qdir, root, tmp_path / "res", batch_size=6, max_new_tokens=2)
    rows = read_dir(tmp_path / "res", True)
    assert {c: len(r) for c, r in rows.items()} == {"color": 6, "OCR": 6}
    assert s == score_mme(rows)
    first = rows["color"][0]
    with Image.open(root / "color" / "images" / first[0]) as im:
        assert model.chat([im], [first[1]], max_new_tokens=2)[0] == first[3]
