"""What is measured of a layer: its unit axis, the part of its output, the call, forward order.

Every value is checked against the layer's output computed again in float64 by the module itself
and reduced here with numpy, never against the recorder's own reduction.
"""

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image
from torch import nn

from conftest import activations, make_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.plugin.discovery import survey
from pytest_memaudit.errors import AuditError
from pytest_memaudit.models.hooks import LayerRecorder, UnitAxis
from pytest_memaudit.models import InputContract, LayerSpec, ModelSpec
from pytest_memaudit.results.result import AuditResult

IMAGENET = InputContract(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class SwinLike(nn.Module):
    """Swin's patch embedding: a strided conv, then channels-last, then a LayerNorm: (B, H, W, C)."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, channels, 4, stride=4), ToChannelsLast(), nn.LayerNorm(channels))
        self.mix = nn.Linear(channels, channels)

    def forward(self, x):
        return self.mix(self.embed(x))


class ReusedReLU(nn.Module):
    """One ReLU module applied twice, as torchvision's ResNet blocks do."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) - 0.1)


class Attention(nn.Module):
    """Patch tokens into nn.MultiheadAttention, which returns (output, weights)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def tokens(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return tokens if self.batch_first else tokens.transpose(0, 1)

    def forward(self, x):
        tokens = self.tokens(x)
        return self.attn(tokens, tokens, tokens)[0]


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return {"features": self.conv(x), "logits": self.conv(x).sum(dim=(2, 3))}


def seeded(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.5)
    return net.eval()


def record(net: nn.Module, layers: list[LayerSpec], x: torch.Tensor) -> tuple[dict, LayerRecorder]:
    with LayerRecorder(net, layers) as recorder, torch.no_grad():
        net(x)
        return {name: values.double().numpy() for name, values in recorder.take().items()}, recorder


def mean_abs(tensor: torch.Tensor, keep: int) -> np.ndarray:
    """float64 mean |a| over every axis but 0 and ``keep``."""
    a = np.abs(tensor.detach().double().numpy())
    return a.mean(axis=tuple(d for d in range(1, a.ndim) if d != keep))


@pytest.fixture
def x():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_a_swin_style_channels_last_layer_takes_its_units_from_the_last_axis(x):
    net = seeded(SwinLike())
    values, recorder = record(net, [LayerSpec("embed", "embed")], x)
    assert recorder.axes["embed"] == UnitAxis(3, (4, 4, 6), "inferred from embed.2.normalized_shape = 6")
    expected = mean_abs(net.double().embed(x.double()), keep=3)  # (2, 6): the 6 channels, over 4 x 4 positions
    np.testing.assert_allclose(values["embed"], expected, rtol=1e-6)
    assert values["embed"].shape == (2, 6)  # not the 4 image rows, as axis 1 would give


def test_an_ambiguous_axis_is_an_error_naming_the_layer_shape_and_keys():
    net = seeded(SwinLike())
    x = torch.rand(2, 3, 24, 24)  # (2, 6, 6, 6): the width 6 is on every axis
    with pytest.raises(AuditError) as info:
        record(net, [LayerSpec("embed", "embed")], x)
    message = str(info.value)
    for part in ("layer 'embed'", "(batch, 6, 6, 6)", "matches axes [1, 2, 3]", "units: channels_first | channels_last | token_channels",
                 "units_axis: N"):
        assert part in message
    values, recorder = record(net, [LayerSpec("embed", "embed", units="channels_last")], x)
    assert recorder.axes["embed"].source == "units: channels_last"
    np.testing.assert_allclose(values["embed"], mean_abs(net.double().embed(x.double()), keep=3), rtol=1e-6)
    values, _ = record(net.float(), [LayerSpec("embed", "embed", units=-1)], x)
    np.testing.assert_allclose(values["embed"], mean_abs(net.double().embed(x.double()), keep=3), rtol=1e-6)


def test_a_module_without_a_width_needs_units():
    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(AuditError, match=r"layer '1' \(module '1'\), output of shape \(batch, 4, 14, 14\): cannot tell "
                                         r"which axis holds the units: the module declares no width"):
        record(net, [LayerSpec("1", "1")], torch.rand(2, 3, 16, 16))


def test_a_reused_relu_is_an_error_unless_a_call_is_chosen(x):
    net = seeded(ReusedReLU())
    with pytest.raises(AuditError) as info:
        record(net, [LayerSpec("relu", "relu")], x)
    message = str(info.value)  # both problems at once: the count, and the axis a bare ReLU cannot declare
    assert "runs 2 times per forward pass; measure one call with 'call: N' (0 to 1) or their mean with 'call: all'" in message
    assert "cannot tell which axis holds the units" in message
    with torch.no_grad():
        double = net.double()
        first = double.relu(double.conv1(x.double()))
        second = double.relu(double.conv2(first) - 0.1)
    net.float()
    expected = {0: mean_abs(first, 1), 1: mean_abs(second, 1), "all": (mean_abs(first, 1) + mean_abs(second, 1)) / 2}
    for call, values in expected.items():
        got, _ = record(net, [LayerSpec("relu", "relu", units="channels_first", call=call)], x)
        np.testing.assert_allclose(got["relu"], values, rtol=1e-6, err_msg=f"call {call}")
    assert not np.allclose(expected[0], expected[1])
    with pytest.raises(AuditError, match=r"has 'call: 2' but runs 2 time\(s\) per forward pass"):
        record(net, [LayerSpec("relu", "relu", units="channels_first", call=2)], x)


class ReusedAtTwoWidths(nn.Module):
    """One ReLU module applied at two widths, as ResNet-50's Bottleneck applies its relu (64, 64, 256)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 7, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_call_all_on_a_module_reused_at_two_widths_is_an_error_naming_the_shapes(x):
    net = seeded(ReusedAtTwoWidths())
    with pytest.raises(AuditError) as info:
        record(net, [LayerSpec("relu", "relu", units="channels_first", call="all")], x)
    message = str(info.value)
    assert ("layer 'relu' (module 'relu') has 'call: all', but its calls differ in shape: call 0 gave (batch, 5, 16, "
            "16), call 1 (2, 7, 16, 16), so their units cannot be averaged") in message
    assert "each call as a layer of its own (the same module, with call: 0, call: 1, ...)" in message
    with torch.no_grad():  # each call as a layer of its own is measured
        double = net.double()
        first = double.relu(double.conv1(x.double()))
        second = double.relu(double.conv2(first))
    layers = [LayerSpec(f"relu.{call}", "relu", units="channels_first", call=call) for call in (0, 1)]
    got, _ = record(net.float(), layers, x)
    np.testing.assert_allclose(got["relu.0"], mean_abs(first, 1), rtol=1e-6)
    np.testing.assert_allclose(got["relu.1"], mean_abs(second, 1), rtol=1e-6)


def test_list_layers_shows_the_call_an_audit_measures_of_a_reused_module(x):
    net = seeded(ReusedAtTwoWidths())
    for call, width in ((0, 5), (1, 7)):
        records = {entry.path: entry for entry in survey(net, x, [LayerSpec("relu", "relu", units="channels_first",
                                                                            call=call)])}
        assert (records["relu"].output, records["relu"].units, records["relu"].calls) == (
            str((2, width, 16, 16)), width, 2), f"call {call}"
    assert [entry.path for entry in survey(net, x)] == ["conv1", "relu", "conv2"]  # forward order, by first call


def test_a_module_that_never_runs_is_an_error_after_the_first_pass(x):
    """nn.MultiheadAttention holds out_proj but uses its weights directly: its hook never fires."""
    net = seeded(Attention())
    with pytest.raises(AuditError) as info:
        record(net, [LayerSpec("embed", "embed"), LayerSpec("attn.out", "attn.out_proj")], x)
    message = str(info.value)
    assert "layer 'attn.out' (module 'attn.out_proj') never runs in the model's forward pass" in message
    assert "--memaudit-list-layers" in message and "embed" not in message


class TokenMixing(nn.Module):
    """Patch tokens (batch, 64 tokens, 24 channels) through a token-mixing Linear (64 -> 64), as in
    MLP-Mixer, and optionally a channel-mixing one (24 -> 24) after it."""

    def __init__(self, channel_mixing: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 2, stride=2)
        self.block = nn.Sequential(nn.LayerNorm(24), Transposed(nn.Linear(64, 64)))
        if channel_mixing:
            self.block.append(nn.Linear(24, 24))

    def forward(self, x):
        return self.block(self.embed(x).flatten(2).transpose(1, 2))


class Transposed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


def test_a_token_mixing_block_is_asked_about_not_read_with_tokens_as_units(x):
    net = seeded(TokenMixing())
    with pytest.raises(AuditError) as info:  # the last declared width, 64, is the token count
        record(net, [LayerSpec("block", "block")], x)
    assert ("layer 'block' (module 'block'), output of shape (batch, 64, 24): block.1.inner.out_features = 64 would "
            "put the units on axis 1, the tokens of a (batch, tokens, channels) layout") in str(info.value)
    assert "'units: token_channels' (axis 2) or 'units_axis: 1'" in str(info.value)
    with pytest.raises(AuditError, match=r"two readings are plausible: block.2.out_features = 24 puts the units on "
                                         r"axis 2 \(channels\), block.1.inner.out_features = 64 on axis 1 \(tokens\)"):
        record(seeded(TokenMixing(channel_mixing=True)), [LayerSpec("block", "block")], x)
    values, recorder = record(net, [LayerSpec("block", "block", units="token_channels")], x)
    assert recorder.axes["block"] == UnitAxis(2, (64, 24), "units: token_channels")
    with torch.no_grad():
        double = net.double()
        expected = mean_abs(double.block(double.embed(x.double()).flatten(2).transpose(1, 2)), keep=2)
    np.testing.assert_allclose(values["block"], expected, rtol=1e-6)  # 24 channels, each over 64 tokens


def test_a_tuple_returning_attention_needs_output_and_measures_that_part(x):
    net = seeded(Attention())
    with pytest.raises(AuditError, match=r"layer 'attn' \(module 'attn'\) returns a tuple of 2: \[0\] \(2, 16, 8\), "
                                         r"\[1\] \(2, 16, 16\); say which part to measure with 'output: N'"):
        record(net, [LayerSpec("attn", "attn")], x)
    values, recorder = record(net, [LayerSpec("attn", "attn", output=0)], x)
    assert recorder.axes["attn"] == UnitAxis(2, (16, 8), "inferred from attn.out_proj.out_features = 8")
    with torch.no_grad():
        double = net.double()
        tokens = double.tokens(x.double())
        output = double.attn(tokens, tokens, tokens)[0]
    # float32 attention (a softmax) against float64: 1e-5 relative, before any reduction
    np.testing.assert_allclose(values["attn"], mean_abs(output, 2), rtol=5e-5)
    net.float()
    for tokens_choice, part in (("cls", output[:, :1]), ("patches", output[:, 1:])):
        got, _ = record(net, [LayerSpec("attn", "attn", output=0, tokens=tokens_choice)], x)
        np.testing.assert_allclose(got["attn"], mean_abs(part, 2), rtol=5e-5)
    with pytest.raises(AuditError, match=r"'output: 2' is not a part of what it returns"):
        record(net, [LayerSpec("attn", "attn", output=2)], x)


def test_an_output_without_the_batch_first_is_an_error(x):
    net = seeded(Attention(batch_first=False))  # (tokens, batch, units)
    with pytest.raises(AuditError, match=r"its output of shape \(16, 2, 8\) does not have the batch \(2 views\) on axis 0"):
        record(net, [LayerSpec("attn", "attn", output=0)], x)


def test_a_dict_output_is_measured_by_key(x):
    net = seeded(DictOutput())
    with pytest.raises(AuditError, match=r"returns a dict with 'features': \(2, 4, 14, 14\), 'logits': \(2, 4\); say "
                                         r"which part to measure with 'output: KEY'"):
        record(net, [LayerSpec("conv", "")], x)
    values, _ = record(net, [LayerSpec("features", "", output="features")], x)
    np.testing.assert_allclose(values["features"], mean_abs(net.double().conv(x.double()), 1), rtol=1e-6)


class Scrambled(nn.Module):
    """Modules registered in an order other than the one they run in."""

    def __init__(self):
        super().__init__()
        self.last = nn.Conv2d(6, 4, 3, padding=1)
        self.middle = nn.Conv2d(5, 6, 3, padding=1)
        self.first = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def spec(name, layers, net, contract=InputContract(), size=16):
    return ModelSpec(name=name, layers=tuple(layers), build=lambda checkpoint: net, default_image_size=size,
                     input_contract=contract)


def test_layers_are_ordered_by_their_forward_pass_and_the_depth_statistic_follows(tmp_path):
    net = seeded(Scrambled())
    layers = [LayerSpec("last", "last"), LayerSpec("first", "first"), LayerSpec("middle", "middle")]
    settings = make_settings(model="scrambled", data=str(make_images(tmp_path / "imgs", 6, size=16)),
                             augmentations=0, control="random", device="cpu", topk=6)
    result = run_audit(settings, spec("scrambled", layers, net))
    assert [layer.name for layer in result.layers] == ["first", "middle", "last"]
    assert [layer.name for layer in result.control.layers] == ["first", "middle", "last"]
    means = [layer.stats.mean_unitmem for layer in result.layers]
    rho, p = scipy.stats.spearmanr(np.arange(3), means)
    assert result.depth_correlation() == pytest.approx((rho, p))
    data = result.to_json()
    assert [layer["name"] for layer in data["layers"]] == ["first", "middle", "last"]
    assert data["summary"]["depth_spearman_rho"] == pytest.approx(rho)


def test_a_channels_last_layer_through_the_audit_of_an_imagenet_normalized_model(tmp_path):
    """The whole audit: views normalized as the model declares, units on the last axis, the axis in the JSON."""
    folder = make_images(tmp_path / "imgs", 5, size=16)
    net = seeded(SwinLike())
    settings = make_settings(model="swinlike", data=str(folder), augmentations=0, control="none", device="cpu", topk=5)
    result = run_audit(settings, spec("swinlike", [LayerSpec("embed", "embed")], net, IMAGENET))
    assert result.layers[0].unit_axis == UnitAxis(3, (4, 4, 6), "inferred from embed.2.normalized_shape = 6")
    pixels = np.stack([np.asarray(Image.open(folder / sample).convert("RGB"), dtype=np.float64) / 255
                       for sample in result.samples])
    normalized = (pixels - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    x = torch.from_numpy(normalized).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = mean_abs(net.double().embed(x), keep=3)
    np.testing.assert_allclose(activations(result, "embed"), expected, rtol=1e-5)
    again = AuditResult.from_json(result.to_json())
    assert again.layers[0].unit_axis == result.layers[0].unit_axis
    assert result.settings["input"].startswith("(x - mean) / std of x in [0, 1], mean [0.485, 0.456, 0.406]")


def test_the_planted_control_plants_along_the_resolved_axis():
    """Implants on a channels-last layer of a normalized model: each planted image is its unit's
    maximum, so the implants saw the same inputs as the model and added along its units."""
    net = seeded(SwinLike())
    settings = make_settings(model="swinlike", data="builtin", holdout="builtin", samples=10, augmentations=2,
                             control="planted", planted_units=3, permutations=100, device="cpu")
    result = run_audit(settings, spec("swinlike", [LayerSpec("embed", "embed"), LayerSpec("mix", "mix")], net,
                                      IMAGENET))
    assert result.planted is not None and result.planted.default_units
    assert all(unit.plant.unit < 6 for unit in result.planted.units)
    assert all(unit.argmax_hit for unit in result.planted.default_units)
