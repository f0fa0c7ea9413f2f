"""The var_d16 encoder: architecture against the spec and the released key manifest, numerics
against an independent float64 forward pass, and checkpoint loading and its errors."""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from pytest_memaudit.errors import CheckpointError
from pytest_memaudit.models import var_layer_specs
from pytest_memaudit.models.var import (
    VAREncoder,
    build_var_d16,
    encoder_state_dict,
    load_checkpoint_file,
    locate_var_d16_checkpoint,
)
from var_checkpoints import FORMS, manifest_encoder_shapes, write_var_checkpoint
from var_reference import reference_forward

# The spec's table of audited layers (channels, HxW at a 256x256 input), in forward order:
# at level 4 each attention block runs right after its residual block.
SPEC_LAYERS = [
    ("conv_in", 160, 256),
    ("down.0.block.0", 160, 256),
    ("down.0.block.1", 160, 256),
    ("down.0.downsample", 160, 128),
    ("down.1.block.0", 160, 128),
    ("down.1.block.1", 160, 128),
    ("down.1.downsample", 160, 64),
    ("down.2.block.0", 320, 64),
    ("down.2.block.1", 320, 64),
    ("down.2.downsample", 320, 32),
    ("down.3.block.0", 320, 32),
    ("down.3.block.1", 320, 32),
    ("down.3.downsample", 320, 16),
    ("down.4.block.0", 640, 16),
    ("down.4.attn.0", 640, 16),
    ("down.4.block.1", 640, 16),
    ("down.4.attn.1", 640, 16),
    ("mid.block_1", 640, 16),
    ("mid.attn_1", 640, 16),
    ("mid.block_2", 640, 16),
    ("norm_out", 640, 16),
    ("conv_out", 32, 16),
]
LAYER_PATHS = [layer.module for layer in var_layer_specs()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("var_checkpoints")
    return {form: write_var_checkpoint(folder / f"{form}.pth", form, seed=0) for form in FORMS}


@pytest.fixture(scope="module")
def bare_state(checkpoints):
    """The encoder weights written into every checkpoint form, keyed without prefix."""
    return load_checkpoint_file(checkpoints["bare"])


@pytest.fixture(scope="module")
def model(checkpoints):
    return build_var_d16(str(checkpoints["vqvae"]))


@pytest.fixture
def meta_model():
    with torch.device("meta"):
        return VAREncoder()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No checkpoint configured anywhere; HOME is an empty folder."""
    for name in ("MEMAUDIT_CHECKPOINT", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@contextmanager
def hooked(model, paths, fn):
    """Call ``fn(path, module, inputs, output)`` from a forward hook on each module path."""
    handles = [
        model.get_submodule(path).register_forward_hook(lambda mod, inp, out, path=path: fn(path, mod, inp, out))
        for path in paths
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def image(size, seed=1):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


# --------------------------------------------------------------------------------------------
# Architecture


def test_state_dict_matches_released_manifest():
    encoder = VAREncoder()
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    manifest = manifest_encoder_shapes()
    assert len(manifest) == 132
    assert list(shapes) == list(manifest)
    assert shapes == manifest
    assert sum(p.numel() for p in encoder.parameters()) == 44_107_872
    assert list(encoder.buffers()) == []


def test_module_names():
    names = {name for name, _ in VAREncoder().named_modules()}
    assert set(LAYER_PATHS) <= names
    assert {n for n in names if n.endswith("nin_shortcut")} == {"down.2.block.0.nin_shortcut", "down.4.block.0.nin_shortcut"}
    assert {n for n in names if n.startswith("down.") and n.endswith(".attn")} == {"down.4.attn"}
    assert {n for n in names if n.endswith("downsample.conv")} == {f"down.{i}.downsample.conv" for i in range(4)}
    assert not any("dropout" in n for n in names)


def test_layer_specs_are_the_spec_table_in_forward_order():
    assert LAYER_PATHS == [path for path, _, _ in SPEC_LAYERS]
    assert sum(channels for _, channels, _ in SPEC_LAYERS) == 8192


@pytest.mark.parametrize("size", [256, 64])
def test_forward_order_channels_and_sizes(model, size):
    seen = []
    with hooked(model, LAYER_PATHS, lambda path, mod, inp, out: seen.append((path, tuple(out.shape)))):
        with torch.no_grad():
            out = model(image(size))
    expected = [(path, (1, channels, hw * size // 256, hw * size // 256)) for path, channels, hw in SPEC_LAYERS]
    assert seen == expected
    assert out.shape == (1, 32, size // 16, size // 16)


def test_reduced_width_has_the_same_layers():
    small = VAREncoder(ch=32)
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == manifest_encoder_shapes(ch=32)
    seen = []
    with hooked(small, LAYER_PATHS, lambda path, mod, inp, out: seen.append((path, out.shape[1]))):
        with torch.no_grad():
            assert small(image(32)).shape == (1, 32, 2, 2)
    assert seen == [(path, 32 if path == "conv_out" else channels // 5) for path, channels, _ in SPEC_LAYERS]


def test_norm_out_output_is_overwritten_by_inplace_silu(model):
    """Only a hook that reduces norm_out's output at once gets the pre-SiLU (audited) values."""
    captured = {}

    def hook(path, mod, inputs, output):
        captured["input"] = inputs[0].clone()
        captured["kept"] = output  # a reference, not a copy
        captured["reduced"] = output.abs().mean(dim=(2, 3))

    with hooked(model, ["norm_out"], hook), torch.no_grad():
        model(image(64))
    norm = model.norm_out
    pre_silu = F.group_norm(captured["input"], 32, norm.weight, norm.bias, eps=1e-6)
    assert (pre_silu < -0.5).sum() > 100
    torch.testing.assert_close(captured["reduced"], pre_silu.abs().mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured["kept"], F.silu(pre_silu), rtol=1e-5, atol=1e-6)
    assert captured["kept"].min() > -0.279  # SiLU's minimum is about -0.2785
    assert (captured["kept"].abs().mean(dim=(2, 3)) - captured["reduced"]).abs().max() > 0.1


# --------------------------------------------------------------------------------------------
# Numerics against the independent float64 forward pass


def test_float32_module_matches_float64_reference(model, bare_state):
    x = image(64)
    outputs = {}
    with hooked(model, LAYER_PATHS, lambda path, mod, inp, out: outputs.__setitem__(path, out.clone())):
        with torch.no_grad():
            out = model(x)
    ref_out, ref_layers = reference_forward(bare_state, x)
    assert list(ref_layers) == LAYER_PATHS
    assert rel_err(out, ref_out) < 1e-4
    for path in LAYER_PATHS:
        assert outputs[path].shape == ref_layers[path].shape, path
        assert rel_err(outputs[path], ref_layers[path]) < 1e-4, path
        # The synthetic weights keep every layer finite and varied.
        assert torch.isfinite(ref_layers[path]).all(), path
        assert 0.05 < ref_layers[path].std().item() < 100, path


def test_float64_module_matches_reference_exactly(bare_state):
    encoder = VAREncoder().double()
    encoder.load_state_dict(bare_state)
    x = image(32, seed=2)
    with torch.no_grad():
        out = encoder(x.double())
    ref_out, _ = reference_forward(bare_state, x)
    assert rel_err(out, ref_out) < 1e-10


# --------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_the_same_encoder_weights(checkpoints, bare_state, meta_model, form):
    state = load_checkpoint_file(checkpoints[form])
    assert len(state) == {"vqvae": 324, "encoder": 132, "bare": 132}[form]
    weights = encoder_state_dict(state, meta_model, str(checkpoints[form]))
    assert list(weights) == list(manifest_encoder_shapes())
    for key, value in weights.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, bare_state[key]), key


def test_build_var_d16_loads_weights_in_eval_mode(model, bare_state, checkpoints):
    assert isinstance(model, VAREncoder)
    assert not model.training
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    for key, value in bare_state.items():
        assert torch.equal(params[key], value), key
    again = build_var_d16(str(checkpoints["encoder"]))
    assert all(torch.equal(p, params[k]) for k, p in again.named_parameters())


def test_nested_state_dict_is_unwrapped(tmp_path):
    weight = torch.arange(6.0).reshape(2, 3)
    path = tmp_path / "train.pth"
    torch.save({"model": {"conv_in.weight": weight}, "epoch": 7}, path)
    state = load_checkpoint_file(path)
    assert list(state) == ["conv_in.weight"]
    assert torch.equal(state["conv_in.weight"], weight)


def test_other_floating_dtypes_become_float32(bare_state, meta_model):
    state = dict(bare_state, **{"conv_in.weight": bare_state["conv_in.weight"].half()})
    weights = encoder_state_dict(state, meta_model, "half.pth")
    assert weights["conv_in.weight"].dtype == torch.float32
    assert torch.equal(weights["conv_in.weight"], bare_state["conv_in.weight"].half().float())


# --------------------------------------------------------------------------------------------
# Unreadable or unsafe files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint_file(tmp_path / "nope.pth")
    assert "nope.pth" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory") as info:
        load_checkpoint_file(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty \(0 bytes\)"):
        load_checkpoint_file(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"conv_in.weight": torch.randn(160, 3, 3, 3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint") as info:
        load_checkpoint_file(path)
    assert "cut.pth" in str(info.value)
    assert f"({len(data) // 2:,} bytes)" in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize("first_byte", [0x00, ord("h"), 0x63, 0xFF])
def test_random_bytes(tmp_path, first_byte):
    path = tmp_path / "noise.pth"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(first_byte), dtype=torch.uint8)
    path.write_bytes(bytes([first_byte]) + bytes(noise.tolist()))
    with pytest.raises(CheckpointError, match="noise.pth .* is truncated, corrupt or not a PyTorch checkpoint"):
        load_checkpoint_file(path)


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PlainObject:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "torch.save-object-in-dict"])
def test_pickle_with_code_or_objects_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(RunsCode(marker), path)
    elif writer == "pickle.dump":
        path.write_bytes(pickle.dumps({"w": torch.zeros(2), "x": RunsCode(marker)}))
    else:
        torch.save({"conv_in.weight": torch.zeros(2), "extra": PlainObject()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert "evil.pth" in message
    assert "refused by the safe loader" in message
    assert "could run arbitrary code" in message
    assert "torch.save(model.state_dict()" in message
    if writer == "torch.save":
        assert "posix.system" in message
    if writer == "torch.save-object-in-dict":
        assert "PlainObject" in message
    assert not marker.exists()


def test_top_level_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="tensor.pth holds a Tensor, not a state_dict"):
        load_checkpoint_file(path)


def test_dict_with_non_tensor_entries(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"conv_in.weight": torch.zeros(2), "epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="mixed.pth is a dict but not a state_dict.*: epoch, lr"):
        load_checkpoint_file(path)


# --------------------------------------------------------------------------------------------
# Checkpoints that do not fit the encoder


def test_not_a_var_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 512)}
    torch.save(resnet, path)
    with pytest.raises(CheckpointError, match="is not a VAR VQVAE checkpoint") as info:
        build_var_d16(str(path))
    message = str(info.value)
    assert "resnet.pth" in message and "conv1.weight, bn1.weight, fc.weight" in message
    assert "FoundationVision/var" in message


def test_vqvae_without_encoder(meta_model):
    state = {"decoder.conv_in.weight": torch.zeros(1), "quantize.embedding.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="has VQVAE parts but no encoder weights"):
        encoder_state_dict(state, meta_model, "dec.pth")


def test_missing_keys_are_named(bare_state, meta_model):
    state = {f"encoder.{k}": v for k, v in bare_state.items() if k not in ("conv_out.bias", "mid.attn_1.qkv.weight")}
    state["decoder.conv_in.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        encoder_state_dict(state, meta_model, "short.pth")
    message = str(info.value)
    assert "short.pth does not fit the VAREncoder" in message
    assert "2 missing key(s): encoder.mid.attn_1.qkv.weight, encoder.conv_out.bias" in message
    assert "unexpected" not in message and "decoder" not in message


def test_many_missing_keys_are_previewed_with_a_count(bare_state, meta_model):
    state = {k: v for k, v in bare_state.items() if not k.startswith("down.0.")}
    with pytest.raises(CheckpointError, match=r"18 missing key\(s\): down\.0\.block\.0\.norm1\.weight, .*\.\.\. \(18 in all\)"):
        encoder_state_dict(state, meta_model, "partial.pth")


def test_unexpected_encoder_keys_are_named(bare_state, meta_model):
    state = {f"encoder.{k}": v for k, v in bare_state.items()}
    state["encoder.down.0.attn.0.qkv.weight"] = torch.zeros(480, 160, 1, 1)
    state["decoder.anything"] = torch.zeros(1)  # ignored: not the encoder's namespace
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): encoder\.down\.0\.attn\.0\.qkv\.weight\.") as info:
        encoder_state_dict(state, meta_model, "extra.pth")
    assert "missing" not in str(info.value)


def test_misshaped_weights_name_both_shapes(bare_state, meta_model):
    state = dict(bare_state)
    state["down.2.block.0.conv1.weight"] = torch.zeros(160, 160, 3, 3)
    state["norm_out.bias"] = torch.zeros(320)
    with pytest.raises(CheckpointError) as info:
        encoder_state_dict(state, meta_model, "wide.pth")
    message = str(info.value)
    assert "2 mis-shaped tensor(s)" in message
    assert "down.2.block.0.conv1.weight (expected 320x160x3x3, found 160x160x3x3)" in message
    assert "norm_out.bias (expected 640, found 320)" in message


def test_nan_and_inf_weights_are_named(bare_state, meta_model):
    state = dict(bare_state)
    bad = state["mid.attn_1.qkv.weight"].clone()
    bad[5, 7] = float("nan")
    state["mid.attn_1.qkv.weight"] = bad
    state["conv_in.bias"] = torch.full((160,), float("inf"))
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in encoder weights: conv_in\.bias, mid\.attn_1\.qkv\.weight\."):
        encoder_state_dict(state, meta_model, "nan.pth")


def test_non_floating_weights_are_named(bare_state, meta_model):
    state = dict(bare_state, **{"conv_in.bias": torch.zeros(160, dtype=torch.int64)})
    with pytest.raises(CheckpointError, match=r"non-floating-point encoder weights: conv_in\.bias \(torch\.int64\)"):
        encoder_state_dict(state, meta_model, "int.pth")


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


def _snapshot(hub, revision, mtime):
    folder = hub / "models--FoundationVision--var" / "snapshots" / revision
    folder.mkdir(parents=True)
    (folder / "vae_ch160v4096z32.pth").touch()
    os.utime(folder, (mtime, mtime))
    return folder / "vae_ch160v4096z32.pth"


def test_locate_explicit_path(clean_env, tmp_path, monkeypatch):
    path = tmp_path / "mine.pth"
    path.touch()
    monkeypatch.setenv("MEMAUDIT_CHECKPOINT", str(tmp_path / "other.pth"))
    assert locate_var_d16_checkpoint(str(path)) == path


def test_locate_explicit_directory_holding_the_file(clean_env, tmp_path):
    (tmp_path / "vae_ch160v4096z32.pth").touch()
    assert locate_var_d16_checkpoint(str(tmp_path)) == tmp_path / "vae_ch160v4096z32.pth"


def test_locate_explicit_path_missing(clean_env, tmp_path):
    _snapshot(clean_env / ".cache" / "huggingface" / "hub", "abc", 1_000_000)
    with pytest.raises(CheckpointError, match="the checkpoint path given .*gone.pth.* does not exist"):
        locate_var_d16_checkpoint(str(tmp_path / "gone.pth"))


def test_locate_env_var(clean_env, tmp_path, monkeypatch):
    path = tmp_path / "env.pth"
    path.touch()
    monkeypatch.setenv("MEMAUDIT_CHECKPOINT", str(path))
    assert locate_var_d16_checkpoint(None) == path
    monkeypatch.setenv("MEMAUDIT_CHECKPOINT", str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match=r"\$MEMAUDIT_CHECKPOINT \(.*missing.pth\) does not exist"):
        locate_var_d16_checkpoint(None)


def test_locate_hf_cache_default_newest_snapshot(clean_env):
    hub = clean_env / ".cache" / "huggingface" / "hub"
    _snapshot(hub, "old", 1_000_000)
    newest = _snapshot(hub, "new", 2_000_000)
    _snapshot(hub, "older", 500_000)
    assert locate_var_d16_checkpoint(None) == newest


def test_locate_hf_home_and_hub_cache(clean_env, tmp_path, monkeypatch):
    _snapshot(clean_env / ".cache" / "huggingface" / "hub", "default", 1_000_000)
    in_home = _snapshot(tmp_path / "hf_home" / "hub", "a", 1_000_000)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert locate_var_d16_checkpoint(None) == in_home
    in_hub = _snapshot(tmp_path / "hub_cache", "b", 1_000_000)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    assert locate_var_d16_checkpoint(None) == in_hub


def test_locate_nothing_found(clean_env):
    snapshots = clean_env / ".cache" / "huggingface" / "hub" / "models--FoundationVision--var" / "snapshots"
    (snapshots / "x").mkdir(parents=True)  # a snapshot without the file
    with pytest.raises(CheckpointError) as info:
        locate_var_d16_checkpoint(None)
    message = str(info.value)
    for needed in (
        "vae_ch160v4096z32.pth",
        "436 MB",
        "FoundationVision/var",
        "--memaudit-checkpoint PATH",
        "MEMAUDIT_CHECKPOINT",
        str(snapshots / "<revision>" / "vae_ch160v4096z32.pth"),
        "Nothing is downloaded automatically",
        "--memaudit-model demo",
    ):
        assert needed in message, needed
