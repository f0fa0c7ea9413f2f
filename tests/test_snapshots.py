"""Resuming an audit from its snapshots, and refusing snapshots of another audit."""

import re

import numpy as np
import pytest
import torch

import pytest_memaudit.pipeline.setup
from conftest import make_images, tiny_spec
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import AuditError

TINY = tiny_spec()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    data = make_images(tmp_path / "imgs", 9, size=16)
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"weights v1")
    values = dict(model="tiny", data=str(data), checkpoint=str(checkpoint), augmentations=2, batch_size=4,
                  control="none", reduce="median", state=str(tmp_path / "state"))
    return tmp_path, values


def audit(**values):
    return run_audit(make_settings(**values), TINY)


def test_rerun_of_a_finished_audit_reuses_its_state(setup):
    tmp_path, values = setup
    first = audit(**values)
    assert (tmp_path / "state" / "process-00000-of-00001.pt").exists()
    again = audit(**values)
    assert "9 of 9 data points had been streamed before" in again.notes[-1]
    assert again.timing["forward_s"] == 0  # nothing streamed again
    assert again.samples == first.samples
    for a, b in zip(first.layers, again.layers):
        np.testing.assert_array_equal(a.values.unitmem, b.values.unitmem)
        np.testing.assert_array_equal(a.values.top_samples, b.values.top_samples)


@pytest.mark.parametrize("change, expected", [
    ("settings", r"settings: reduce 'median' then, 'mean' now"),
    ("checkpoint", r"checkpoint sha256: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"),
    ("data", r"data listing: '9 data points, sha256 [0-9a-f]+' then, '10 data points, sha256 [0-9a-f]+' now"),
    ("version", r"pytest-memaudit version: '0.1.0' then, '9.9' now"),
    ("garbage", r"cannot read the snapshot .*process-00000-of-00001.pt"),
])
def test_snapshots_of_another_audit_are_refused(setup, monkeypatch, change, expected):
    tmp_path, values = setup
    audit(**values)
    if change == "settings":
        values["reduce"] = "mean"
    elif change == "checkpoint":
        (tmp_path / "weights.bin").write_bytes(b"weights v2")
    elif change == "data":
        make_images(tmp_path / "more", 10, size=16)
        values["data"] = str(tmp_path / "more")
    elif change == "version":
        monkeypatch.setattr(pytest_memaudit.pipeline.setup, "__version__", "9.9")
    else:
        (tmp_path / "state" / "process-00000-of-00001.pt").write_bytes(b"not a snapshot")
    with pytest.raises(AuditError, match=expected):
        audit(**values)


def test_rounding_only_settings_may_change(setup):
    _, values = setup
    first = audit(**values)
    again = audit(**values | {"batch_size": 2, "workers": 0, "state_every": 5})
    assert again.samples == first.samples and "streamed before" in again.notes[-1]


def test_state_that_is_a_file_is_an_error(setup):
    tmp_path, values = setup
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditError, match="is a file; give a directory"):
        audit(**values | {"state": str(tmp_path / "file")})


def test_interrupted_audit_with_controls_and_holdout_resumes_to_the_same_figures(setup):
    tmp_path, values = setup
    values |= dict(holdout=str(make_images(tmp_path / "held", 5, size=16, seed=3)), control="random,planted",
                   planted_units=2, permutations=200, state_every=0)
    uninterrupted = audit(**values | {"state": None})
    calls = []

    def interrupt_after_three_batches(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit(make_settings(**values), TINY, progress=interrupt_after_three_batches)
    resumed = audit(**values)
    assert any(f"{calls[1]} of 14 data points had been streamed before" in note for note in resumed.notes)  # batch 2
    assert resumed.samples == uninterrupted.samples and resumed.labels == uninterrupted.labels
    for subject in ("layers", "control"):
        ours = resumed.layers if subject == "layers" else resumed.control.layers
        theirs = uninterrupted.layers if subject == "layers" else uninterrupted.control.layers
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a.values.unitmem, b.values.unitmem, rtol=1e-5)
            assert a.values.max_sample.tolist() == b.values.max_sample.tolist()
    assert [u.unitmem for u in resumed.planted.units] == pytest.approx([u.unitmem for u in uninterrupted.planted.units])
    assert resumed.membership.member_share == uninterrupted.membership.member_share
    # The per-image signals streamed before the interruption came back from the snapshot.
    assert [(s.signal, s.layer) for s in resumed.signals] == [(s.signal, s.layer) for s in uninterrupted.signals]
    assert len(resumed.signals) == 4 * len(resumed.layers)
    np.testing.assert_allclose([(s.auc, s.low, s.high, s.p_value) for s in resumed.signals],
                               [(s.auc, s.low, s.high, s.p_value) for s in uninterrupted.signals], rtol=1e-6)


def _damage(path, change):
    saved = torch.load(path, weights_only=True)
    change(saved["payload"])
    torch.save(saved, path)


def _drop_last_position(payload):
    payload["measured"]["positions"] = payload["measured"]["positions"][:-1]


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["progress"].update(done=10**9), "its progress counter says 1000000000 data points, this process's "
                                                 "share has 9"),
    (lambda p: p["progress"].update(done=-5), "its progress counter says -5 data points"),
    (lambda p: p["progress"].update(done=0), "the model state of layer conv1 holds 4 data points, not the 0 its "
                                             "progress says were read"),  # would stream the data twice
    (_drop_last_position, "it lists 3 data points measured, but its image characteristics, signals and "
                              "embedding cover [4]"),
    (lambda p: p["progress"].update(skipped=[[10**12, "x"]]), "its 1 skipped data points are not distinct data points"),
    (lambda p: p["progress"].update(skipped=[[0, "x"]]), "the model state of layer conv1 holds 4 data points, not the 3"),
    (lambda p: p["progress"].update(skipped="absurd"), "ValueError"),
    (lambda p: p["progress"].update(done="many"), "ValueError"),
    (lambda p: p.pop("measured"), "it lacks part of this audit's state ('measured')"),
], ids=["done-1e9", "done-negative", "done-0", "positions-truncated", "skipped-out-of-range", "skipped-but-read",
        "skipped-not-a-list", "done-not-a-number", "part-missing"])
def test_a_damaged_snapshot_is_refused_naming_the_file(setup, change, expected):
    """Each of these resumed into other figures (or crashed after the whole compute) before."""
    tmp_path, values = setup
    calls = []

    def interrupt_after_two_batches(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit(make_settings(**values | {"state_every": 0}), TINY, progress=interrupt_after_two_batches)
    path = tmp_path / "state" / "process-00000-of-00001.pt"
    _damage(path, change)
    with pytest.raises(AuditError, match=f"the snapshot {re.escape(str(path))} is damaged: .*{re.escape(expected)}"):
        audit(**values)
