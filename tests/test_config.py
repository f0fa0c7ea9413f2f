"""Audit YAML files, settings and threshold resolution."""

import pytest

from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.gates.limits import parse_threshold_option
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import ConfigError
from pytest_memaudit.results.outcomes import Gate
from pytest_memaudit.models import BUILTIN_MODELS

VAR = BUILTIN_MODELS["var_d16"]


def write(tmp_path, text, name="memaudit.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_threshold_precedence(tmp_path):
    path = write(tmp_path, """
thresholds: {ttest_p_max: 0.05, mean_unitmem_max: 0.8}
layers:
  conv.out: {ttest_p_max: 0.1}
  down.3.block.1: {mean_unitmem_max: 0.9}
models:
  var_d16:
    thresholds: {mean_unitmem_max: 0.7, gap_min: 0.2}
    layers:
      conv_out: {gap_min: 0.1}
""")
    resolved = load_audit_file(path).thresholds_for(VAR, {"*": {"ttest_p_max": {"limit": 0.01}},
                                                           "norm.out": {"gap_min": {"limit": 0.5}}})
    assert resolved["conv.in"]["mean_unitmem_max"].limit == 0.7  # model beats file-wide
    assert resolved["down.3.block.1"]["mean_unitmem_max"].limit == 0.9  # layer beats model-wide
    assert resolved["conv.out"]["gap_min"].limit == 0.1  # addressed by module path
    assert resolved["conv.out"]["ttest_p_max"].limit == 0.01  # command line beats all
    assert resolved["norm.out"]["gap_min"].limit == 0.5
    assert resolved["conv.in"]["fraction_above_level"] == 0.9  # built-in default
    assert resolved["conv.in"]["dead_fraction_max"] == Gate(None)
    assert len(resolved) == 22


def test_empty_file_means_no_thresholds(tmp_path):
    resolved = load_audit_file(write(tmp_path, "")).thresholds_for(VAR)
    assert resolved["conv.in"]["ttest_p_max"].limit is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("thresholds: {ttest_p_mx: 0.05}", r"thresholds: unknown key 'ttest_p_mx'. Did you mean 'ttest_p_max'"),
        ("tresholds: {}", r"the top level: unknown key 'tresholds'. Did you mean 'thresholds'"),
        ("thresholds: {ttest_p_max: 'low'}", r"thresholds: ttest_p_max must be a number .* got 'low'"),
        ("thresholds: {ttest_p_max: true}", r"must be a number"),
        ("thresholds: {gap_min: 1.5}", r"gap_min = 1.5 is outside \[0, 1\]"),
        ("thresholds: [1, 2]", r"thresholds must be a mapping"),
        ("thresholds: {a: [1, 2", r"invalid YAML \(line \d+, column \d+\)"),
        ("- 1\n- 2", r"the top level must be a mapping"),
        ("models: {mine: {factory: nocolon}}", r"factory must be 'package.module:function'"),
        ("models: {mine: {factory: 'a:b'}}", r"audited_layers must be a non-empty list"),
        ("models: {var_d16: {layer: {}}}", r"models: var_d16: unknown key 'layer'. Did you mean 'layers'"),
        ("thresholds: {ttest_p_max: {limit: 0.05, when: significant}}",
         r"when: significant needs a figure with an interval; ttest_p has none.*excess_over_control_max"),
        ("thresholds: {gap_min: {limit: 0.1, when: always}}", r"when must be one of estimate, significant"),
        ("thresholds: {gap_min: {limit: 0.1, severity: fatal}}", r"severity must be one of fail, warn"),
        ("thresholds: {gap_min: {limt: 0.1}}", r"unknown field 'limt'"),
        ("thresholds: {fraction_above_level: null}", r"fraction_above_level must be a number"),
        ("multiple_testing: bonferroni", r"multiple_testing must be one of holm, none"),
        ("thresholds: {membership_excess_max: -1.5}", r"membership_excess_max = -1.5 is outside \[-1, 1\]"),
        *[(f"models: {{mine: {{factory: 'a:b', {entry}}}}}", message) for entry, message in [
            ("audited_layers: [{module: x, units: rows}]",
             r"audited_layers: x: units must be one of channels_first, channels_last, token_channels, got 'rows'"),
            ("audited_layers: [{module: x, units: token_channels, units_axis: 2}]", r"give units or units_axis, not both"),
            ("audited_layers: [{module: x, units: tokens}]",
             r"audited_layers: x: 'units: tokens' is now 'units: token_channels' \(the channels of each token, axis 2 "
             r"of a \(batch, tokens, channels\) output\); rename it"),
            ("audited_layers: [{module: x, units_axis: 0}]", r"units_axis must be the number .* \(0 is the batch"),
            ("audited_layers: [{module: x, tokens: first}]", r"tokens must be one of all, cls, patches"),
            ("audited_layers: [{module: x, call: -1}]", r"call must be a call's number \(0 is the first\) or 'all'"),
            ("audited_layers: [{module: x, output: [0]}]", r"output must be a part's index \(0, 1, ...\) or key"),
            ("audited_layers: [{module: x, unit: channels_last}]", r"audited_layers: x: unknown key 'unit'. Did you mean 'units'"),
            ("audited_layers: [{name: y}]", r"entry \{'name': 'y'\} is not a module path or a mapping with a module"),
            ("audited_layers: [x, {name: x, module: y}]", r"audited_layers: 'x' is listed twice \(entries 1 and 2\)"),
            ("audited_layers: [x], input_range: [1, 0]", r"input_range must be \[low, high\] with low < high"),
            ("audited_layers: [x], normalize: {mean: [0.5, 0.5], std: [1, 1, 1]}", r"normalize: mean must be 3 numbers"),
            ("audited_layers: [x], normalize: {mean: [0, 0, 0], std: [1, 0, 1]}", r"normalize: std must be positive"),
            ("audited_layers: [x], input_range: [0, 1], normalize: {mean: [0, 0, 0], std: [1, 1, 1]}",
             r"give input_range or normalize, not both"),
            ("audited_layers: [x], channels_last: yes please", r"channels_last must be true or false"),
            ("audited_layers: [x], checkpoint: 3", r"checkpoint must be a path"),
        ]],
    ],
)
def test_bad_files_name_the_file_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_audit_file(path)
    assert str(path) in str(info.value)


def test_unknown_layer_has_did_you_mean(tmp_path):
    audit = load_audit_file(write(tmp_path, "layers: {down.3.blok.1: {gap_min: 0.1}}"))
    with pytest.raises(ConfigError, match=r"memaudit.yaml: layers: model var_d16 has no layer 'down.3.blok.1'. Did you mean 'down.3.block.1'"):
        audit.thresholds_for(VAR)


def test_user_model(tmp_path):
    audit = load_audit_file(write(tmp_path, """
models:
  mine:
    factory: mypkg.enc:build
    audited_layers: [stem, {name: block.one, module: blocks.1}]
    image_size: 64
    thresholds: {gap_min: 0.3}
"""))
    spec = audit.model_spec("mine")
    assert [(l.name, l.module) for l in spec.layers] == [("stem", "stem"), ("block.one", "blocks.1")]
    assert spec.default_image_size == 64
    assert audit.thresholds_for(spec)["block.one"]["gap_min"].limit == 0.3
    with pytest.raises(ConfigError, match=r"unknown model 'mien'. Did you mean 'mine'"):
        audit.model_spec("mien")


def test_user_model_keys(tmp_path):
    from pytest_memaudit.models import InputContract, LayerSpec

    audit = load_audit_file(write(tmp_path, """
models:
  mine:
    factory: mypkg.enc:build
    checkpoint: weights/mine.pt
    normalize: {mean: [0.5, 0.25, 0.125], std: [0.5, 0.5, 0.25]}
    audited_layers:
      - stem
      - {name: attn, module: blocks.0.attn, output: 0, call: all, units: token_channels, tokens: cls}
      - {module: blocks.1, units_axis: -1, call: 1, output: features}
"""))
    spec = audit.model_spec("mine")
    assert spec.layers == (LayerSpec("stem", "stem"),
                           LayerSpec("attn", "blocks.0.attn", units="token_channels", tokens="cls", output=0, call="all"),
                           LayerSpec("blocks.1", "blocks.1", units=-1, output="features", call=1))
    assert spec.input_contract == InputContract(mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))
    # view = 2x - 1 in [-1, 1]; (x - m) / s = view * scale + shift
    scale, shift = spec.input_contract.affine()
    for x in (0.0, 0.3, 1.0):
        assert [(2 * x - 1) * a + b for a, b in zip(scale, shift)] == pytest.approx(
            [(x - 0.5) / 0.5, (x - 0.25) / 0.5, (x - 0.125) / 0.25])
    assert spec.checkpoint == str(tmp_path.resolve() / "weights" / "mine.pt") and spec.requires_data
    assert InputContract().affine() is None  # VAR's [-1, 1]: the views as they are
    assert InputContract(value_range=(0.0, 1.0)).affine() == ((0.5,) * 3, (0.5,) * 3)


def test_settings_validation():
    assert make_settings(model="var_d16", samples="12").samples == 12
    assert make_settings().reduce == "mean"
    for bad, message in [
        ({"image_size": 100}, "multiple of 16"),
        ({"samples": 1}, "at least 2"),
        ({"augmentations": -1}, "at least 0"),
        ({"reduce": "max"}, "mean, median"),
        ({"device": "tpu"}, "auto, cpu, cuda"),
        ({"batch_size": "many"}, "whole number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_settings(**bad)


def test_threshold_option():
    assert parse_threshold_option("ttest_p_max=0.01") == ("*", "ttest_p_max", {"limit": 0.01})
    assert parse_threshold_option("down.3.block.1:gap_min=0.2") == ("down.3.block.1", "gap_min", {"limit": 0.2})
    assert parse_threshold_option("gap_min=off") == ("*", "gap_min", {"limit": None})
    assert parse_threshold_option("fraction_above_level=0.8") == ("*", "fraction_above_level", {"value": 0.8})
    for bad, message in [("gap_min", "KEY=VALUE"), ("gapmin=0.1", "Did you mean 'gap_min'"), ("gap_min=x", "not a number")]:
        with pytest.raises(ConfigError, match=message):
            parse_threshold_option(bad)


def test_gate_fields_merge_level_by_level(tmp_path):
    audit = load_audit_file(write(tmp_path, """
multiple_testing: none
thresholds:
  excess_over_control_max: {limit: 0.3, when: significant}
  membership_p_min: {limit: 0.01, severity: warn}
layers:
  conv.out: {excess_over_control_max: 0.2, membership_p_min: {severity: fail}}
"""))
    assert audit.multiple_testing == "none"
    resolved = audit.thresholds_for(VAR, {"down.0.block.0": {"excess_over_control_max": {"limit": None}}})
    assert resolved["conv.in"]["excess_over_control_max"] == Gate(0.3, "significant", "fail")
    assert resolved["conv.out"]["excess_over_control_max"] == Gate(0.2, "significant", "fail")  # number: limit only
    assert resolved["conv.in"]["membership_p_min"] == Gate(0.01, "estimate", "warn")
    assert resolved["conv.out"]["membership_p_min"] == Gate(0.01, "estimate", "fail")
    assert resolved["down.0.block.0"]["excess_over_control_max"].limit is None  # turned off on the command line
    assert load_audit_file(write(tmp_path, "")).multiple_testing == "holm"


def test_settings_for_controls_and_holdout():
    assert make_settings(control="random, planted").control == "random,planted"
    assert make_settings(control="none").control == "none"
    assert make_settings(planted_strength="4").planted_strength == 4.0
    for bad, message in [
        ({"control": "randm"}, "none or a comma-separated list of random, planted"),
        ({"control": "none,random"}, "none or a comma-separated list"),
        ({"planted_strength": 0.5}, "a number above 1"),
        ({"groups": 1}, "at least 2"),
        ({"permutations": 10}, "at least 100"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_settings(**bad)
@pytest.mark.parametrize(
    "layers, expected",
    [
        ("[stem, stem]", r"audited_layers: 'stem' is listed twice \(entries 1 and 2\)"),
        ("[{name: a, module: stem}, {name: a, module: head}]", r"audited_layers: 'a' is listed twice \(entries 1 and 2\)"),
        ("[{name: head, module: stem}, {name: out, module: head}]", r"audited_layers: 'head' names entry 1 and is the module of entry 2"),
        ("[stem, {name: stem2, module: stem}]", r"audited_layers: module 'stem' is audited twice \(entries 1 and 2\)"),
        ("[{name: 3, module: stem}]", r"audited_layers: stem: name must be a non-empty string, got 3"),
    ],
)
def test_user_model_layers_must_be_unambiguous(tmp_path, layers, expected):
    path = write(tmp_path, f"models:\n  mine:\n    factory: 'a:b'\n    audited_layers: {layers}\n")
    with pytest.raises(ConfigError, match=expected):
        load_audit_file(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "thresholds:\nlayers:\n", "thresholds: {gap_min: null}\n",
                                  "thresholds: {fraction_above_level: 0.5}\n"])
def test_an_audit_that_gates_nothing_is_an_error(tmp_path, text):
    audit = load_audit_file(write(tmp_path, text))
    thresholds = audit.thresholds_for(VAR)
    with pytest.raises(ConfigError, match=r"memaudit.yaml: no layer has a threshold, so every layer would pass "
                                          r"whatever it measures.*allow_no_gates: true"):
        audit.check_gates(thresholds)


def test_gates_after_overrides_and_controls(tmp_path):
    audit = load_audit_file(write(tmp_path, "layers: {conv.out: {gap_min: 0.1}}\n"))
    audit.check_gates(audit.thresholds_for(VAR))  # one layer gated: fine
    with pytest.raises(ConfigError, match=r"no layer has a threshold \(after --memaudit-threshold\)"):
        audit.check_gates(audit.thresholds_for(VAR, {"conv.out": {"gap_min": {"limit": None}}}), overridden=True)


def test_allow_no_gates(tmp_path):
    audit = load_audit_file(write(tmp_path, "allow_no_gates: true\n"))
    audit.check_gates(audit.thresholds_for(VAR))
    with pytest.raises(ConfigError, match=r"allow_no_gates must be true or false, got 'yes please'"):
        load_audit_file(write(tmp_path, "allow_no_gates: yes please\n"))
