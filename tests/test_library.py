"""The library API without pytest: run_audit, gates.evaluate_result, report.write_report."""

import sys
import textwrap

import numpy as np
import pytest

from conftest import make_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.gates.thresholds import evaluate_result
from pytest_memaudit.report import write_report
from pytest_memaudit.results.result import AuditResult

ENCODER = '''
import torch
from torch import nn


def build(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
'''


@pytest.fixture
def audited(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the YAML's folder goes on sys.path: undo that
    (tmp_path / "library_encoder.py").write_text(ENCODER)
    path = tmp_path / "memaudit.yaml"
    path.write_text(textwrap.dedent("""\
        thresholds: {mean_unitmem_max: 0.99}
        models:
          lib:
            factory: library_encoder:build
            audited_layers: [{name: first, module: "0"}, {name: second, module: "2"}]
            image_size: 16
            layers: {second: {mean_unitmem_max: 0.001}}
        """))
    audit = load_audit_file(path)
    spec = audit.model_spec("lib")
    data = make_images(tmp_path / "imgs", 5, size=16)
    result = run_audit(make_settings(model="lib", data=str(data), augmentations=1, control="none", device="cpu"), spec)
    return audit, spec, result


def test_evaluate_result_gates_every_layer_as_the_yaml_says(audited):
    audit, spec, result = audited
    outcomes = evaluate_result(result, audit.thresholds_for(spec), audit.multiple_testing)
    assert list(outcomes) == ["first", "second"]
    assert outcomes["first"].passed and not outcomes["second"].passed
    (check,) = [c for c in outcomes["second"].checks if not c.passed]
    assert check.key == "mean_unitmem_max" and check.limit == 0.001
    assert check.value == pytest.approx(float(np.mean(result.layer("second").values.unitmem)))
    data = result.to_json()  # the outcomes are kept on the result, as the plugin keeps them
    assert [layer["outcome"] for layer in data["layers"]] == ["passed", "failed"]
    assert [layer.outcome.status for layer in AuditResult.from_json(data).layers] == ["passed", "failed"]


def test_write_report_renders_thumbnails_of_the_audited_images(audited, tmp_path):
    _, spec, result = audited
    path = write_report(result, tmp_path / "out" / "report.html", model=spec)
    html = path.read_text()
    names_only = write_report(result, tmp_path / "names.html", gallery="names").read_text()
    assert "second" in html and "img_000.png" in html and "img_000.png" in names_only
    assert html.count("data:image/") > names_only.count("data:image/")  # the thumbnails, beside the figures
