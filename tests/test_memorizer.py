"""Encoder-only memorization (train_demo --memorizer): a tiny memorizer built in seconds and audited
with its loss attack, the shipped demo_memorizer, and the YAML ``loss:`` factory through pytest."""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_memaudit.pipeline.audit  # noqa: F401  (pytester runs: see test_user_models.py)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.report  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.errors import ConfigError
from pytest_memaudit.metric.imagesignals import auc
from pytest_memaudit.models import LayerSpec, ModelSpec, get_model_spec
from pytest_memaudit.models.demo import (DECODER_IMAGES, DECODER_START, DEMO_IMAGES, HOLDOUT_START, MEMBER_START,
                                         MEMORIZER_DECODER, MEMORIZER_HOLDOUT, MEMORIZER_MEMBERS, MEMORIZER_METADATA,
                                         MEMORIZER_WEIGHTS, memorizer_holdout_set, memorizer_member_set, pixels_sha256)
from pytest_memaudit.results.result import AuditResult
from pytest_memaudit.models.train_demo import as_pixels, fit_decoder, memorize, parse_args, reconstruction_errors

sys.path.insert(0, str(Path(__file__).parent))
from conftest import on_one_thread, one_layer_model_source  # noqa: E402
from tiny_encoder import LAYERS, build  # noqa: E402

pytest_plugins = ["pytester"]
MEMBERS = ImageSet.builtin(6, 16, 0, start=4000)
HELDOUT = ImageSet.builtin(24, 16, 0, start=4100)


def tiny_memorizer(steps: int):
    """The tiny encoder, a small decoder fitted to it frozen on other images, then the encoder alone
    trained ``steps`` steps on MEMBERS. Returns the decoder and the encoder before and after."""
    encoder = build(None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
                                nn.Conv2d(32, 3, 3, padding=1))
    fit_decoder(encoder, as_pixels(ImageSet.builtin(32, 16, 0, start=3000)), 40, seed=0, decoder=decoder)
    kept = memorize(encoder, decoder, as_pixels(MEMBERS), steps, seed=0, lr=3e-3, keep_at=(0,))
    untrained = build(None)
    untrained.load_state_dict(kept[0])
    return decoder, untrained, encoder


def audit(encoder, decoder):
    def loss(checkpoint):
        return lambda images: F.mse_loss(decoder(encoder(images)), images, reduction="none").mean((1, 2, 3))

    spec = ModelSpec("tiny_memorizer", tuple(LayerSpec(name, name) for name in LAYERS), build=lambda _: encoder,
                     default_image_size=16, default_data=lambda size, seed: MEMBERS,
                     default_holdout=lambda size: HELDOUT, loss=loss, default_control="none")
    return run_audit(make_settings(model="tiny_memorizer", augmentations=4, permutations=999, control="none"),
                     model=spec)


@pytest.fixture(scope="module")
def memorizer():
    """(decoder, encoder before, encoder after 300 steps): built once for the module's tests, on one
    thread (for a model this small, a second thread only waits, and on a busy machine far longer)."""
    with on_one_thread():
        return tiny_memorizer(300)


def test_a_tiny_memorizer_is_found_by_its_loss_attack(memorizer):
    decoder, _, encoder = memorizer
    result = audit(encoder, decoder)
    signals = {(s.signal, s.layer): s for s in result.signals}
    assert set(signals) == {(signal, layer) for signal in ("view_alignment", "activation_norm", "neighbour_distance",
                                                           "argmax_units") for layer in LAYERS} | {("loss", "model")}
    loss = signals[("loss", "model")]
    assert (loss.n_members, loss.n_heldout, loss.permutations) == (6, 24, 999)
    assert loss.p_value < 0.01 and loss.low > 0.5
    # The loss attack's AUC, from the plain images' reconstruction errors computed here.
    errors = reconstruction_errors(encoder, decoder, as_pixels(MEMBERS)), reconstruction_errors(
        encoder, decoder, as_pixels(HELDOUT))
    assert loss.auc == pytest.approx(auc(-errors[0], -errors[1]), abs=1e-9)
    assert AuditResult.from_json(json.loads(json.dumps(result.to_json()))).signals == result.signals


def test_a_tiny_null_is_not_found(memorizer):
    decoder, untrained, _ = memorizer  # the decoder fitted, the encoder never trained on the members
    result = audit(untrained, decoder)
    assert min(s.p_value for s in result.signals) > 0.01


def test_the_shipped_memorizer_is_reproducible_from_its_metadata():
    spec = get_model_spec("demo_memorizer")
    metadata = json.loads(MEMORIZER_METADATA.read_text())
    members, holdout = memorizer_member_set(), memorizer_holdout_set()
    assert metadata["data"]["members"] == members.ids and metadata["data"]["holdout"] == holdout.ids
    assert metadata["data"]["members_pixels_sha256"] == pixels_sha256(members)
    assert metadata["data"]["holdout_pixels_sha256"] == pixels_sha256(holdout)
    # Disjoint from the demo's training and held-out images and from the decoder's images.
    ranges = [(0, 2 * DEMO_IMAGES), (DECODER_START, DECODER_START + DECODER_IMAGES),
              (MEMBER_START, MEMBER_START + MEMORIZER_MEMBERS), (HOLDOUT_START, HOLDOUT_START + MEMORIZER_HOLDOUT)]
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert spec.locate(None) == MEMORIZER_WEIGHTS and MEMORIZER_WEIGHTS.stat().st_size < 8 * 2**20
    assert spec.default_data(64, 0).ids == members.ids and spec.default_holdout(64).ids == holdout.ids
    encoder = spec.build(spec.locate(None))
    loss = spec.loss(spec.locate(None))
    x = as_pixels(ImageSet(members.ids[:2] + holdout.ids[:2], None, 64, 0))
    with torch.inference_mode():
        per_image = loss(x)
    assert per_image.shape == (4,)
    recorded = metadata["per_image_mse"]
    np.testing.assert_allclose(per_image.numpy(), [recorded[i] for i in members.ids[:2] + holdout.ids[:2]], rtol=1e-4)
    assert torch.equal(encoder.conv_in.weight, torch.load(MEMORIZER_WEIGHTS, weights_only=True)["conv_in.weight"].float())
    assert MEMORIZER_DECODER.is_file()


def test_memorizer_options():
    args = parse_args(["--out", "x.pt", "--memorizer"])
    assert (args.steps, args.lr, args.decoder_steps, args.members, args.threads) == (100, 2e-3, 150, MEMORIZER_MEMBERS, 1)
    assert (parse_args(["--out", "x.pt"]).steps, parse_args(["--out", "x.pt"]).lr) == (2000, 2e-3)
    with pytest.raises(SystemExit):
        parse_args(["--out", "x.pt", "--memorizer", "--members", "0"])




def declare(pytester, suffix=""):
    folder = pytester.path / "audits"
    folder.mkdir()
    (folder / "lossy.py").write_text(one_layer_model_source(f"images.flatten(1).pow(2).mean(1){suffix}"))
    (folder / "memaudit_lossy.yaml").write_text(textwrap.dedent("""\
        thresholds: {mean_unitmem_max: 1.0}
        allow_no_gates: true
        models:
          lossy:
            factory: lossy:build
            loss: lossy:loss
            audited_layers: [stem]
            image_size: 16
        """))


FAST = ["--memaudit-model", "lossy", "--memaudit-data", "builtin", "--memaudit-holdout", "builtin",
        "--memaudit-samples", "6", "--memaudit-augmentations", "2", "--memaudit-control", "none",
        "--memaudit-permutations", "200", "-p", "no:cacheprovider"]


def test_a_yaml_loss_factory_is_reported_beside_the_signals(pytester):
    declare(pytester)
    result = pytester.runpytest("audits", "--memaudit-json", "out.json", *FAST)
    assert result.ret == 0, result.stdout.str()
    data = json.loads((pytester.path / "out.json").read_text())
    rows = {(row["signal"], row["layer"]): row for row in data["signals"]}
    assert set(rows) == {("view_alignment", "stem"), ("activation_norm", "stem"), ("neighbour_distance", "stem"),
                         ("argmax_units", "stem"), ("loss", "model")}
    assert all(set(row) >= {"estimate", "low", "high", "p_value", "auc", "n_members", "n_heldout"} for row in rows.values())
    assert (rows[("loss", "model")]["n_members"], rows[("loss", "model")]["n_heldout"]) == (6, 6)
    html = (pytester.path / "memaudit-report" / "report.html").read_text()
    assert "Per-image signals" in html and "Reference attack" in html


def test_a_loss_of_the_wrong_shape_is_a_usage_error(pytester):
    declare(pytester, suffix="[:1]")
    result = pytester.runpytest("audits", *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["*its loss function returned (1,) for a batch of * images; it must return one loss "
                                 "per image*"])


def test_a_loss_that_is_not_a_factory_reference_is_a_config_error(tmp_path):
    (tmp_path / "memaudit.yaml").write_text("models:\n  m:\n    factory: a:b\n    loss: 3\n    audited_layers: [x]\n")
    with pytest.raises(ConfigError, match="loss must be 'package.module:function'"):
        load_audit_file(tmp_path / "memaudit.yaml")
