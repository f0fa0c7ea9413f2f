"""What gets memorized: per data point scores against numpy, characteristics of the images as the
model saw them, classes, clusters, and the JSON and report that carry them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats
from torch import nn

from conftest import make_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.data.characteristics import CHARACTERISTICS, image_characteristics
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.data.images import decode_image
from pytest_memaudit.analysis.datapoints import kept_digits, score_data_points
from pytest_memaudit.models import LayerSpec, ModelSpec
from pytest_memaudit.report import render_html
from pytest_memaudit.report.memorized import classes as memorized_classes
from pytest_memaudit.report.thumbnails import Gallery, display_id
from pytest_memaudit.results import result as results
from pytest_memaudit.results.result import AuditResult
from pytest_memaudit.metric.unitmem import HOLDOUT, MEMBER, LayerState


def test_scores_match_a_direct_computation():
    rng = np.random.default_rng(0)
    n = 30
    matrices = {"a": rng.gamma(2, 1, size=(n, 9)), "b": rng.gamma(2, 1, size=(n, 5))}
    labels = np.array([MEMBER] * 20 + [HOLDOUT] * 10)
    states = {}
    for name, matrix in matrices.items():
        states[name] = LayerState(matrix.shape[1], topk=3)
        states[name].update(torch.from_numpy(matrix.astype(np.float32)), torch.arange(n),
                            torch.from_numpy(labels), torch.arange(n) % 10)
    unitmem = {name: rng.random(m.shape[1]) for name, m in matrices.items()}
    points = score_data_points(states, unitmem, (MEMBER, HOLDOUT), n)
    score, units, best = np.zeros(n), np.zeros(n, dtype=int), np.full(n, np.inf)
    for name, matrix in matrices.items():
        m32 = matrix.astype(np.float32)
        for u in range(matrix.shape[1]):
            top = np.argsort(-m32[:, u], kind="stable")[:3]
            score[top[0]] += unitmem[name][u]
            units[top[0]] += 1
            for rank, i in enumerate(top, 1):
                best[i] = min(best[i], rank)
    np.testing.assert_allclose(points.score, score, rtol=5e-7)  # kept to 7 significant digits
    assert points.argmax_units.tolist() == units.tolist()
    np.testing.assert_array_equal(points.best_rank, np.where(np.isinf(best), np.nan, best))
    assert sum(c.sum() for c in points.layer_argmax_units.values()) == 14


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Conv2d(12, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


SPEC = ModelSpec(name="small", layers=(LayerSpec("conv", "conv"), LayerSpec("head", "head")),
                 build=lambda checkpoint: Small(), default_image_size=16)


def audit(**settings):
    values = dict(model="small", augmentations=0, device="cpu", control="none", permutations=200) | settings
    return run_audit(make_settings(**values), SPEC)


def odd_images(folder):
    """Images in modes the audit converts: alpha, greyscale, 16-bit greyscale, CMYK, palette."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "a_alpha.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(folder / "b_grey.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(folder / "c_grey16.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK").save(folder / "d_cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(folder / "e_palette.png")
    make_images(folder, 3, size=16, seed=1)
    return folder


def test_characteristics_are_those_of_the_images_the_model_saw(tmp_path):
    data = odd_images(tmp_path / "imgs")
    result = audit(data=str(data), workers=1)  # measured in a decoding worker
    seen = torch.stack([decode_image(data / sample, 16) for sample in result.samples])
    expected = image_characteristics(seen)
    points = result.memorized.points
    assert set(points.characteristics) == set(CHARACTERISTICS)
    for name, values in expected.items():  # kept to 7 significant digits
        np.testing.assert_allclose(points.characteristics[name], values, rtol=5e-7, atol=0, err_msg=name)


def test_json_carries_scores_and_correlations_and_reads_back(tmp_path):
    members = make_images(tmp_path / "train", 12, size=16, seed=1)
    held = make_images(tmp_path / "val", 8, size=16, seed=2)
    result = audit(data=str(members), holdout=str(held))
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    points = data["data_points"]
    assert points["ids"] == result.samples and len(points["score"]) == 20
    assert sum(points["argmax_units"]) == result.units == 18
    assert set(points["characteristics"]) == set(CHARACTERISTICS)
    members_rows = [i for i, label in enumerate(result.labels) if label == "member"]
    for name, entry in data["image_characteristics"].items():
        x = np.array(points["characteristics"][name], dtype=float)[members_rows]
        y = np.array(points["score"])[members_rows]
        keep = ~np.isnan(x)
        assert entry["n"] == keep.sum() and entry["dropped"] == (~keep).sum()
        if entry["rho"] is not None:
            rho, p = scipy_stats.spearmanr(x[keep], y[keep])
            assert entry["rho"] == pytest.approx(rho) and entry["p_value"] == pytest.approx(p)
            assert entry["ci_low"] <= entry["rho"] <= entry["ci_high"]
    assert set(data["image_characteristics_holdout"]) == set(CHARACTERISTICS)
    assert AuditResult.from_json(data).to_json() == data


def test_a_report_rendered_again_from_its_json_is_identical(tmp_path):
    """--memaudit-from renders the report from results.json: the per data point values it reads back
    must be the very values the fresh audit's report showed (its scatter titles once read 0.7263 where
    the original read 0.7264, the JSON having rounded them and the report not)."""
    result = audit(data=str(make_images(tmp_path / "train", 10, size=16, seed=3)),
                   holdout=str(make_images(tmp_path / "val", 6, size=16, seed=4)))
    again = AuditResult.from_json(json.loads(json.dumps(result.to_json(), allow_nan=False)))
    before, after = result.memorized.points, again.memorized.points
    np.testing.assert_array_equal(after.score, before.score)
    for name, values in before.characteristics.items():
        np.testing.assert_array_equal(after.characteristics[name], values, err_msg=name)
    assert render_html(again, None, "names") == render_html(result, None, "names")


def test_class_folders_give_a_class_table(tmp_path):
    data = tmp_path / "imgs"
    for k, cls in enumerate(["ant", "bee", "fern"]):
        make_images(data / cls, 6, size=16, seed=10 + k)
    result = audit(data=str(data), augmentations=1)
    classes = result.memorized.classes
    assert classes.names == ["ant", "bee", "fern"] and classes.images.tolist() == [6, 6, 6]
    score = result.memorized.points.score
    groups = [score[[i for i, s in enumerate(result.samples) if s.startswith(f"{c}/")]] for c in classes.names]
    np.testing.assert_allclose(classes.mean_score, [g.mean() for g in groups])
    h, p = scipy_stats.kruskal(*groups)
    assert classes.kruskal_h == pytest.approx(h) and classes.kruskal_p == pytest.approx(p)
    units = result.memorized.points.argmax_units
    assert classes.unit_share.sum() == pytest.approx(1.0)  # every unit's argmax is a member here
    by_class = [units[[i for i, s in enumerate(result.samples) if s.startswith(f"{c}/")]] for c in classes.names]
    np.testing.assert_allclose(classes.unit_share, [u.sum() / units.sum() for u in by_class])
    rows = memorized_classes(result, Gallery(result.samples, "names"))["rows"]
    for row in rows:  # each class shows its highest-scoring image
        best = max((i for i, s in enumerate(result.samples) if s.startswith(f"{row['name']}/")), key=lambda i: score[i])
        assert row["point"].label == display_id(result.samples[best])
    page = render_html(result, None, "names")
    assert 'id="memorized"' in page and "Kruskal-Wallis" in page and ">fern<" in page
    assert "not testable without class labels" not in page and units.sum() == result.units


def test_flat_folders_have_no_classes_and_say_so(tmp_path):
    result = audit(data=str(make_images(tmp_path / "imgs", 12, size=16, seed=3)))
    assert result.memorized.classes is None
    page = render_html(result, None, "none")
    assert "not testable without class labels" in page
    assert "The seed report&#39;s observations, measured" in page or "The seed report's observations, measured" in page


def test_large_results_are_written_compact_and_per_data_point_numbers_rounded(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "INDENTED_SAMPLES_MAX", 3)
    document = {"samples": ["a", "b", "c", "d"], "score": results.floats_out(kept_digits(np.array([1 / 3, 2.0, 1e-9 / 7,
                                                                                               np.nan])))}
    results.write_json_atomic(tmp_path / "big.json", document)
    text = (tmp_path / "big.json").read_text()
    assert "\n" not in text and ", " not in text
    assert json.loads(text) == {"samples": ["a", "b", "c", "d"], "score": [0.3333333, 2.0, 1.428571e-10, None]}
    results.write_json_atomic(tmp_path / "small.json", {"samples": ["a", "b", "c"]})
    assert (tmp_path / "small.json").read_text().count("\n") == 6
