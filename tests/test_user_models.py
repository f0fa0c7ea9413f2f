"""A user's own encoder through the plugin: checkpoints, failures as usage errors, several audit
files, bare pytest, the memaudit_result fixture in a user's tests, --memaudit-list-layers."""

import json
import sys
import textwrap

import pytest

# pytester's in-process runs forget modules first imported inside them; numpy's and scipy's C
# extensions cannot be loaded twice, so import what an audit uses before any run.
import pytest_memaudit.pipeline.audit  # noqa: F401
import pytest_memaudit.plugin.discovery  # noqa: F401
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.report  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401

pytest_plugins = ["pytester"]

ENCODER = '''
import os

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        {forward_check}
        return self.head(self.act(self.stem(x)))


def build(checkpoint):
    seen = os.environ.get("SEEN_CHECKPOINT")
    if seen:
        with open(seen, "a") as handle:
            handle.write(f"{{checkpoint}}\\n")
    {factory_body}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()
'''
FAST = ["--memaudit-data", "builtin", "--memaudit-samples", "4", "--memaudit-augmentations", "0",
        "--memaudit-control", "none", "--memaudit-html", "none", "-p", "no:cacheprovider"]


def declare(folder, model, layers="[stem, head]", extra="", factory_body="pass", forward_check="pass"):
    """``folder``/memaudit_<model>.yaml declaring ``model``, its factory module beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{model}_encoder.py").write_text(ENCODER.format(factory_body=factory_body, forward_check=forward_check))
    (folder / f"memaudit_{model}.yaml").write_text(textwrap.dedent(f"""\
        models:
          {model}:
            factory: {model}_encoder:build
            audited_layers: {layers}
            image_size: 16
            thresholds: {{mean_unitmem_max: 1.0}}
        """) + textwrap.indent(textwrap.dedent(extra), "    "))
    return folder / f"memaudit_{model}.yaml"


@pytest.fixture
def seen(pytester, monkeypatch):
    """The checkpoint arguments the factories got, one per build."""
    path = pytester.path / "seen.txt"
    monkeypatch.setenv("SEEN_CHECKPOINT", str(path))
    monkeypatch.delenv("MEMAUDIT_CHECKPOINT", raising=False)
    return lambda: path.read_text().splitlines() if path.exists() else []


def assert_usage_error(result, *patterns):
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: memaudit: *{p}*" for p in patterns])
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text


def test_a_user_model_runs_from_a_folder_beside_its_factory(pytester, seen):
    declare(pytester.path / "audits" / "mine", "mine")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-json", "out.json", "-v", *FAST)
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / "out.json").read_text())
    assert [(layer["name"], layer["channels"], layer["unit_axis"]["axis"]) for layer in data["layers"]] == [
        ("stem", 4, 1), ("head", 6, 1)]
    assert seen() == ["None"]  # built once, at collection, and reused by the audit
    assert data["checkpoint"] is None and data["settings"]["input"] == "RGB in [-1, 1]"


def test_the_checkpoint_reaches_the_factory_from_the_option_the_environment_or_the_yaml(pytester, seen, monkeypatch):
    folder = pytester.path / "audits" / "mine"
    declare(folder, "mine", extra="checkpoint: weights/mine.pt\n")
    for name in ("weights/mine.pt", "env.pt", "option.pt"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"weights")
    args = ["audits", "--memaudit-model", "mine", "--collect-only", *FAST]
    assert pytester.runpytest(*args).ret == 0
    monkeypatch.setenv("MEMAUDIT_CHECKPOINT", str(folder / "env.pt"))
    assert pytester.runpytest(*args).ret == 0
    assert pytester.runpytest(*args, "--memaudit-checkpoint", str(folder / "option.pt")).ret == 0
    assert seen() == [str(folder / "weights/mine.pt"), str(folder / "env.pt"), str(folder / "option.pt")]
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-json", "out.json", *FAST)
    result.assert_outcomes(passed=2)
    record = json.loads((pytester.path / "out.json").read_text())["checkpoint"]
    assert record["path"] == str(folder / "env.pt") and record["bytes"] == 7


def test_a_run_says_when_it_cannot_test_memorization(pytester, seen):
    """Without a checkpoint a user model is its factory's build(None) (random weights in the shipped examples),
    and without held-out images there is no membership test: the terminal and the JSON say so; a run with a
    checkpoint and held-out images does not."""
    declare(pytester.path / "audits", "mine")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-json", "out.json", *FAST)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["note: no checkpoint given: mine was built by its factory as build(None), which in "
                                 "the shipped examples means random weights*",
                                 "note: no held-out images: whether the model singles out its training images is not "
                                 "tested*"])
    notes = json.loads((pytester.path / "out.json").read_text())["notes"]
    assert sum(note.startswith(("no checkpoint given", "no held-out images")) for note in notes) == 2
    (pytester.path / "mine.pt").write_bytes(b"weights")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-checkpoint", "mine.pt",
                                "--memaudit-holdout", "builtin", "--memaudit-json", "out.json", *FAST)
    assert result.ret == 0
    notes = json.loads((pytester.path / "out.json").read_text())["notes"]
    assert not any(note.startswith(("no checkpoint given", "no held-out images")) for note in notes)


def test_a_missing_checkpoint_is_a_usage_error(pytester, seen):
    declare(pytester.path / "audits", "mine")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-checkpoint", "nowhere.pt", *FAST)
    assert_usage_error(result, "model 'mine': the checkpoint from --memaudit-checkpoint (nowhere.pt) does not exist")
    assert seen() == []


@pytest.mark.parametrize("change, message", [
    ({"factory_body": "raise RuntimeError('size mismatch for stem.weight')"},
     "its factory mine_encoder:build(None) failed*RuntimeError: size mismatch for stem.weight"),
    ({"factory_body": "return None"}, "its factory mine_encoder:build returned NoneType, not a torch.nn.Module"),
    ({"forward_check": "assert x.shape[-1] == 224, 'Wrong image width!'"},
     "the forward pass of mine (model) on views of shape (1, 3, 16, 16) failed*AssertionError: Wrong image width!"),
    ({"factory_body": "import not_a_package_anywhere"},
     "its factory mine_encoder:build(None) failed*ModuleNotFoundError: No module named 'not_a_package_anywhere'"),
], ids=["raises", "returns-none", "forward-fails", "missing-import"])
def test_a_failing_factory_or_forward_pass_is_a_usage_error_with_its_own_message(pytester, seen, change, message):
    declare(pytester.path / "audits", "mine", **change)
    assert_usage_error(pytester.runpytest("audits", "--memaudit-model", "mine", *FAST), message)


def test_an_audited_module_that_never_runs_stops_the_audit_as_a_usage_error_naming_it(pytester):
    """ViT's self_attention.out_proj and Swin's attn.proj are held, not called: one usage error (exit 4)
    after the first batch, not an audit that runs to its end and then fails with INTERNALERROR."""
    declare(pytester.path / "audits", "mine", layers="[stem, spare, head]",
            factory_body="net = Net()\n    net.spare = nn.Conv2d(4, 4, 1)\n    return net")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", *FAST)
    assert_usage_error(result, "layer 'spare' (module 'spare') never runs in the model's forward pass")


def test_a_factory_that_cannot_be_imported_is_a_usage_error(pytester):
    path = declare(pytester.path / "audits", "mine")
    path.write_text(path.read_text().replace("mine_encoder:build", "mine_encoder:bild"))
    assert_usage_error(pytester.runpytest("audits", "--memaudit-model", "mine", *FAST),
                       "module mine_encoder has no function 'bild'")
    path.write_text(path.read_text().replace("mine_encoder:bild", "mine_encodr:build"))
    assert_usage_error(pytester.runpytest("audits", "--memaudit-model", "mine", *FAST),
                       "cannot import factory 'mine_encodr:build': no module 'mine_encodr'")


def test_without_data_a_user_model_is_a_usage_error(pytester):
    declare(pytester.path / "audits", "mine")
    args = [arg for arg in FAST if arg != "builtin" and arg != "--memaudit-data"]
    assert_usage_error(pytester.runpytest("audits", "--memaudit-model", "mine", *args),
                       "model mine is audited on images of its training data: give them with --memaudit-data DIR "
                       "(or --memaudit-data builtin")


def test_a_misspelled_layer_is_a_collection_error_at_collect_only(pytester):
    path = declare(pytester.path / "audits", "mine", layers="[stem, haed]")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--collect-only", *FAST)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*{path}: models: mine: audited_layers: layer 'haed': the model has no module "
                                 "'haed'. Did you mean 'head'?*"])
    path.write_text(path.read_text() + "    layers: {stm: {gap_min: 0.1}}\n")
    path.write_text(path.read_text().replace("haed", "head"))
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--collect-only", *FAST)
    result.stdout.fnmatch_lines(["*models: mine: layers: model mine has no layer 'stm'. Did you mean 'stem'?*"])


def test_an_ambiguous_unit_axis_is_a_usage_error_naming_the_keys(pytester):
    declare(pytester.path / "audits", "mine", layers="[act, head]")  # a ReLU declares no width
    assert_usage_error(pytester.runpytest("audits", "--memaudit-model", "mine", *FAST),
                       "layer 'act' (module 'act'), output of shape (batch, 4, 16, 16): cannot tell which axis holds the "
                       "units*units_axis: N*")


def test_a_second_audit_file_of_another_model_is_skipped_with_the_reason(pytester, seen):
    (pytester.path / "audits").mkdir()
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    declare(pytester.path / "audits" / "one", "one")
    declare(pytester.path / "audits" / "two", "two", layers="[head]")
    result = pytester.runpytest("audits", "--memaudit-model", "one", "-rs", *FAST)
    result.assert_outcomes(passed=4, skipped=1)  # one's layers, gated by its file and by the file of every model
    result.stdout.fnmatch_lines(["*memaudit_two.yaml is about model two; this run audits one "
                                 "(--memaudit-model two audits it)*"])
    result = pytester.runpytest("audits", "--memaudit-model", "two", *FAST)
    result.assert_outcomes(passed=2, skipped=1)
    assert seen() == ["None", "None"]  # each audited model built once; the other never
    result = pytester.runpytest("audits", "--memaudit-model", "var_d16", "--collect-only", *FAST)
    assert result.ret == 0 and seen() == ["None", "None"]  # a built-in model: collection builds nothing


def test_the_same_model_declared_differently_is_a_collection_error_naming_both_files(pytester):
    first = declare(pytester.path / "audits" / "a", "mine")
    second = declare(pytester.path / "audits" / "b", "mine", layers="[head]")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", *FAST)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*model 'mine' is declared differently in {first} and in {second}*"])


def test_bare_pytest_imports_the_factory_beside_the_yaml(pytester):
    """``python -P`` keeps the working directory off sys.path, as the ``pytest`` script does."""
    declare(pytester.path / "audits" / "mine", "mine")
    result = pytester.run(sys.executable, "-P", "-m", "pytest", "audits", "--memaudit-model", "mine", *FAST)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*2 passed*"])


OWN_TEST = """
import os

def test_layers(memaudit_result):
    assert [layer.name for layer in memaudit_result.layers] == ["stem", "head"]
    assert memaudit_result.layer("head").channels == 6
    assert not os.environ.get("FAIL_OWN_TEST")
"""


@pytest.fixture
def own_tests(pytester):
    declare(pytester.path / "audits", "mine")
    pytester.makepyfile(test_own=OWN_TEST)
    return ["--memaudit-model", "mine"] + FAST


def test_the_fixture_under_k_gets_every_layer(pytester, own_tests):
    pytester.runpytest("audits", "test_own.py", "-k", "test_layers", *own_tests).assert_outcomes(passed=1)
    pytester.runpytest("audits", "test_own.py", "-k", "stem or test_layers", *own_tests).assert_outcomes(passed=2)


def test_the_fixture_alone_finds_the_model_under_the_rootdir(pytester, own_tests):
    pytester.runpytest("test_own.py", *own_tests).assert_outcomes(passed=1)


def test_the_fixture_under_lf(pytester, own_tests, monkeypatch):
    args = [arg for arg in own_tests if arg not in ("-p", "no:cacheprovider")]
    monkeypatch.setenv("FAIL_OWN_TEST", "1")
    pytester.runpytest("audits", "test_own.py", *args).assert_outcomes(passed=2, failed=1)
    monkeypatch.delenv("FAIL_OWN_TEST")
    result = pytester.runpytest("audits", "test_own.py", "--lf", *args)
    result.assert_outcomes(passed=1)  # the audit file is not collected again; the fixture still finds the model


def test_the_fixture_skips_with_the_reason_when_no_model_is_found(pytester, own_tests):
    result = pytester.runpytest("test_own.py", "-rs", "--memaudit-model", "nothere", *FAST)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*memaudit: unknown model 'nothere'*"])


def test_list_layers_prints_the_modules_in_forward_order_and_exits_0(pytester):
    declare(pytester.path / "audits", "mine")
    result = pytester.runpytest("audits", "--memaudit-model", "mine", "--memaudit-list-layers", *FAST)
    assert result.ret == 0
    rows = [" ".join(line.split()) for line in result.outlines]
    assert rows == [
        "memaudit: modules of mine in forward order, from one pass of 2 views of 16x16 (RGB in [-1, 1]); * = audited. "
        "Axis 0 is the batch.",
        "module type output unit axis (from) units calls",
        "* stem Conv2d (2, 4, 16, 16) 1 (a Conv2d's output: out_channels = 4) 4 1",
        "act ReLU (2, 4, 16, 16) ? (needs units:) 1",
        "* head Conv2d (2, 6, 8, 8) 1 (a Conv2d's output: out_channels = 6) 6 1",
    ]
    assert "passed" not in result.stdout.str()
    result = pytester.runpytest("audits", "--memaudit-model", "nothere", "--memaudit-list-layers")
    assert_usage_error(result, "unknown model 'nothere'")
