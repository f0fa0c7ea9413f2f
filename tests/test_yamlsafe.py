"""Hostile and mistaken YAML in audit files: every case is a short ConfigError, from the limit
that refuses it before the document is built (each test checks that limit's own message)."""

import pytest

from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.errors import ConfigError, quote
from pytest_memaudit.gates.yamlsafe import MAX_BYTES


def load_error(tmp_path, text: str) -> str:
    path = tmp_path / "memaudit.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_audit_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert len(message) < 600, message[:1000]
    return message


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append(f"thresholds: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    text = billion_laughs()
    assert len(text) < 600  # 9**9 (387 million) strings once expanded
    message = load_error(tmp_path, text)
    assert "aliases" in message and "100,000 values" in message


def test_alias_bomb_inside_a_threshold_value(tmp_path):
    text = billion_laughs().replace("thresholds: *a8", "thresholds: {gap_min: *a8}")
    assert "aliases" in load_error(tmp_path, text)


def test_self_referencing_alias(tmp_path):
    assert "cycle" in load_error(tmp_path, "thresholds: &x {gap_min: *x}\n")


def test_deep_nesting(tmp_path):
    message = load_error(tmp_path, "thresholds: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested more than 64 levels" in message


def test_deep_nesting_through_chained_aliases(tmp_path):
    lines = ["a0: &a0 [0]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 200)]
    assert "more than 64 levels" in load_error(tmp_path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("number", ["1" * 400, "0." + "1" * 400, "1" * 5000], ids=["int400", "float400", "int5000"])
def test_long_numbers(tmp_path, number):
    message = load_error(tmp_path, f"thresholds: {{gap_min: {number}}}\n")
    assert f"is {len(number)} characters long" in message and "at most 32" in message


def test_oversized_file(tmp_path):
    message = load_error(tmp_path, "# " + "x" * MAX_BYTES + "\n")
    assert f"at most {MAX_BYTES:,}" in message


def test_duplicate_key_names_both_lines(tmp_path):
    message = load_error(tmp_path, "thresholds:\n  ttest_p_max: 0.01\n  ttest_p_max: 0.99\n")
    assert "duplicate key 'ttest_p_max' (lines 2 and 3)" in message
    assert "(line 3, column 3)" in message


def test_duplicate_top_level_and_layer_keys(tmp_path):
    assert "duplicate key 'thresholds' (lines 1 and 3)" in load_error(
        tmp_path, "thresholds: {gap_min: 0.1}\nlayers: {}\nthresholds: {gap_min: 0.9}\n")
    assert "duplicate key 'conv.out' (lines 2 and 3)" in load_error(
        tmp_path, "layers:\n  conv.out: {gap_min: 0.1}\n  conv.out: {gap_min: 0.2}\n")


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "memaudit.yaml"
    path.write_text("base: &base {gap_min: 0.1, ttest_p_max: 0.5}\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # not a duplicate-key error
        load_audit_file(path)
    path.write_text("thresholds:\n  <<: {gap_min: 0.1, ttest_p_max: 0.5}\n  gap_min: 0.2\n")
    assert load_audit_file(path).thresholds == {"gap_min": {"limit": 0.2}, "ttest_p_max": {"limit": 0.5}}


def test_long_values_are_quoted_short(tmp_path):
    huge = "x" * 100_000
    message = load_error(tmp_path, f"thresholds: {{gap_min: {huge}}}\n")
    assert "gap_min must be a number" in message
    message = load_error(tmp_path, f"? {huge}\n: 1\n")  # an explicit key: implicit ones stop at 1024
    assert "unknown key" in message
    message = load_error(tmp_path, "thresholds: " + str(list(range(5000))) + "\n")
    assert "must be a mapping" in message


def test_quote_bounds_any_value():
    assert quote("short") == "'short'"
    nested = [[[[[[["deep"]]]]]]]
    assert len(quote(nested)) < 40
    assert len(quote({i: "v" * 1000 for i in range(1000)})) <= 200
    assert len(quote("y" * 10_000)) <= 200
