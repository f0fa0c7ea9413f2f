"""The planted control: the implant's response, the choice of units, the evaluation, and an audit
that finds its planted units."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.models.hooks import LayerRecorder, UnitAxis
from pytest_memaudit.models import LayerSpec, ModelSpec
from pytest_memaudit.controls.random import blind_copy
from pytest_memaudit.controls.planted import (
    CURVE_STRENGTHS,
    CURVE_UNITS,
    InputSketches,
    PlantedRecorder,
    PlantedUnit,
    choose_plants,
    evaluate,
)
from pytest_memaudit.metric.unitmem import UnitMemValues


class TwoConv(nn.Module):
    def __init__(self, width=6, out=5):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.b = nn.Conv2d(width, out, 3, stride=2, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


LAYERS = [LayerSpec("a", "a"), LayerSpec("b", "b")]


def test_implant_adds_its_response_to_its_unit_on_its_views_only():
    """The planted recorder, on the model's own modules: the model's output and measurements stay as
    they are; the planted control's unit 3 of layer b is the model's plus the implant on the views
    whose input to b matches image 40's, and nothing else changes."""
    net = TwoConv().eval()
    rng = torch.Generator().manual_seed(0)
    views = torch.rand(6, 3, 8, 8, generator=rng) * 2 - 1  # b's input: 6 x 8 x 8 values, below SKETCH_SIZE
    with torch.inference_mode():
        own_input = torch.relu(net.a(views[:2]))  # what layer b sees of image 40's two views (views 0, 1)
        centred = own_input.flatten(1) - own_input.flatten(1).mean(dim=1, keepdim=True)
        prototypes = (centred / centred.norm(dim=1, keepdim=True)).view(1, 2, -1)
        plain = net(views)
    plant = PlantedUnit("b", 3, 40, strength=5.0, scale=0.25)
    axes = {"a": UnitAxis(1, (6, 8, 8), "test"), "b": UnitAxis(1, (5, 4, 4), "test")}
    with torch.inference_mode(), LayerRecorder(net, LAYERS) as model:
        rider = PlantedRecorder(net, [plant], LAYERS, {"b": prototypes}, {40: 0}, axes)
        try:
            output = net(views)
            before = {name: value.clone() for name, value in model.take().items()}
            after = rider.combine(before, rider.take())
        finally:
            rider.close()
    torch.testing.assert_close(output, plain, rtol=0, atol=0)  # the model computes what it computed
    torch.testing.assert_close(after["a"], before["a"], rtol=0, atol=0)
    difference = after["b"] - before["b"]
    others = [u for u in range(5) if u != 3]
    assert torch.count_nonzero(difference[:, others]) == 0
    assert torch.count_nonzero(difference[2:, 3]) == 0  # other images' views: no response
    with torch.inference_mode():
        raw = net.b(own_input)[:, 3]  # (5 - 1) x 0.25 = 1 added at every position of the unit
        expected = (raw + 1).abs().mean(dim=(1, 2)) - raw.abs().mean(dim=(1, 2))
    torch.testing.assert_close(difference[:2, 3], expected)


def test_a_network_blind_to_its_input_cannot_recognise_the_planted_image():
    """Every view replaced by one fixed image: the layer's input is the same for all views, so the
    implant responds to all of them alike (or to none), and its unit never singles out its image."""
    net = blind_copy(TwoConv().eval(), torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)))
    views = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sketches = InputSketches(net, LAYERS)
    with torch.inference_mode(), LayerRecorder(net, LAYERS) as model:
        net(views[:2])
        model.take()
        prototypes = {"b": sketches.take()["b"].view(1, 2, -1)}
        sketches.close()
        rider = PlantedRecorder(net, [PlantedUnit("b", 3, 40, 5.0, 0.25)], LAYERS, prototypes, {40: 0},
                                {"b": UnitAxis(1, (5, 8, 8), "test")})
        net(views)
        planted = rider.combine(model.take(), rider.take())["b"][:, 3]
        rider.close()
    assert torch.all(planted == planted[0])  # the same for every view: nothing singled out


def test_plants_spread_over_layers_distinct_and_live():
    scales = {"a": np.array([0.0, 1, 1, 1, 1, 1, 1, 1]), "b": np.ones(40), "c": np.ones(40)}
    plants = choose_plants(scales, images=[100, 101, 102, 103, 104, 105], strength=8.0, seed=4)
    assert len(plants) == 6 + len(CURVE_STRENGTHS) * CURVE_UNITS  # "a" has 7 live units: the rest moved on
    assert sum(p.layer == "a" for p in plants) == 7
    assert len({(p.layer, p.unit) for p in plants}) == len(plants)
    assert not [p for p in plants if p.layer == "a" and p.unit == 0]  # a dead unit is never planted
    default = [p for p in plants if p.strength == 8.0]
    assert sorted(p.image for p in default) == [100, 101, 102, 103, 104, 105]
    assert {p.layer for p in default} == {"a", "b", "c"}
    assert plants == choose_plants(scales, [100, 101, 102, 103, 104, 105], 8.0, seed=4)


def values(unitmem, max_sample, top_samples, top_values, mu_rest):
    unitmem = np.asarray(unitmem, dtype=float)
    return UnitMemValues(unitmem, np.asarray(top_values)[0], np.asarray(mu_rest, dtype=float),
                         np.asarray(max_sample), np.zeros(unitmem.size, dtype=bool), np.asarray(top_values, dtype=float),
                         np.asarray(top_samples))


def test_evaluation_counts_recall_hits_and_the_curve():
    layer = values(
        # 20 units, 3 planted (0, 19, 5): the top 5% of the 17 natural ones is one unit, unit 1 at 0.7
        unitmem=[0.9, 0.7] + [0.1] * 17 + [0.5],
        max_sample=[7] + [0] * 18 + [3],
        top_samples=[[7] + [0] * 18 + [3], [1] * 19 + [8]],
        top_values=[[6.0] + [1.0] * 19, [1.0] * 19 + [0.9]],
        mu_rest=[2.0] + [1.0] * 19,
    )
    plants = [PlantedUnit("x", 0, 7, 8.0, 1.0), PlantedUnit("x", 19, 8, 8.0, 1.0), PlantedUnit("x", 5, 9, 2.0, 1.0)]
    result = evaluate(plants, {"x": layer}, 8.0, None)
    first, second, weak = result.units
    assert (first.rank, first.found, first.argmax_hit, first.measured_strength) == (1, True, True, 3.0)
    assert (second.rank, second.found, second.argmax_hit) == (2, False, False)  # below natural unit 1
    assert weak.rank == 18  # below all 17 natural units
    assert second.measured_strength == pytest.approx(0.9)  # its image is second in its top-k
    assert math.isnan(weak.measured_strength)  # not in the unit's top-k
    assert result.recall == 0.5 and result.argmax_hits == 1 and result.images == [7, 8]
    assert [(p["strength"], p["units"], p["recall"]) for p in result.curve] == [(2.0, 1, 0.0), (8.0, 2, 0.5)]
    assert result.detection_strength is None


def test_an_audit_finds_its_planted_units():
    spec = ModelSpec(name="twoconv", layers=tuple(LAYERS), build=lambda checkpoint: TwoConv(48, 64), default_image_size=16)
    settings = make_settings(model="twoconv", data="builtin", samples=40, holdout="builtin", augmentations=2,
                             planted_units=6, planted_strength=30, device="cpu", control="random,planted",
                             permutations=500)
    result = run_audit(settings, spec)
    assert result.labels.count("member") == 40 and result.labels.count("planted") == 6
    planted = result.planted
    assert len(planted.default_units) == 6 and planted.strength == 30.0
    assert planted.recall == 1.0 and planted.argmax_hits == 6
    planted_ids = {result.samples[i] for i in planted.images}
    assert planted_ids == {s for s, label in zip(result.samples, result.labels) if label == "planted"}
    strongest = max(planted.curve, key=lambda point: point["strength"])
    assert strongest["strength"] == 30.0 and strongest["measured_strength"] > 15
    assert result.control is not None and result.control.membership is not None
    again = run_audit(settings, spec)  # seeded: the same plants, the same figures
    assert [(u.plant, u.unitmem) for u in again.planted.units] == [(u.plant, u.unitmem) for u in planted.units]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 48, 3, stride=2, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_the_control_in_the_models_pass_matches_a_full_pass_copy():
    """The planted control rides on the model's pass. Reference, computed here: a copy of the model
    whose planted units really add the implant to their output on the views of their planted image
    (known here by image, not recognised), every view through it, UnitMem and the membership
    contrast in float64 numpy. Same recall, argmax hits and member share; the membership p within
    permutation noise (2,000 relabellings each). The audited layer is the last, as a planted layer
    in a full-pass copy would also change what later layers compute (the control measured in the
    model's pass leaves them as the model has them)."""
    import copy

    from pytest_memaudit.pipeline.forward import model_input
    from pytest_memaudit.pipeline.setup import open_images
    from pytest_memaudit.pipeline.views import recipe_for, view_seed
    from pytest_memaudit.metric.unitmem import HOLDOUT, MEMBER, PLANTED

    spec = ModelSpec(name="small", layers=(LayerSpec("b", "b"),), build=lambda checkpoint: Small(),
                     default_image_size=16)
    settings = make_settings(model="small", data="builtin", samples=40, holdout="builtin", augmentations=2,
                             planted_units=8, planted_strength=30, device="cpu", control="planted", permutations=2000)
    result = run_audit(settings, spec)
    planted = result.planted

    images = open_images(settings, spec, 16, planted=8)
    recipe = recipe_for(settings, spec)
    assert list(images.ids) == result.samples
    net = copy.deepcopy(Small()).eval()
    current = {}  # the image whose views go through the copy now

    def implant(layer_name):
        def hook(module, inputs, output):
            output = output.clone()
            for unit in planted.units:
                if unit.plant.layer == layer_name and unit.plant.image == current["image"]:
                    output[:, unit.plant.unit] += (unit.plant.strength - 1) * unit.plant.scale
            return output
        return hook

    measured = {"b": []}
    net.b.register_forward_hook(implant("b"))
    net.b.register_forward_hook(lambda m, i, o: measured["b"].append(o.abs().double().mean(dim=(2, 3)).mean(0)))
    with torch.inference_mode():
        for i, image_id in enumerate(images.ids):
            current["image"] = i
            pixels = images.load(i)[None].float() / 255
            views = recipe.make(pixels, 2, [view_seed(settings.seed, image_id)], [image_id])
            net(model_input(views, spec.input_contract))
    a = {name: torch.stack(rows).numpy() for name, rows in measured.items()}  # (data points, units)
    labels = images.labels

    # recall and argmax hits: UnitMem over members and planted images, natural units' top 5%
    over = np.isin(labels, (MEMBER, PLANTED))
    unitmem = {}
    for name, matrix in a.items():
        m = matrix[over]
        top = m.max(axis=0)
        rest = (m.sum(axis=0) - top) / (m.shape[0] - 1)
        unitmem[name] = (top - rest) / (top + rest)
    natural = np.concatenate([np.delete(unitmem[name], [u.plant.unit for u in planted.units if u.plant.layer == name])
                              for name in a])
    slots = math.ceil(0.05 * natural.size)
    index = np.flatnonzero(over)
    found = [1 + np.count_nonzero(natural >= unitmem[u.plant.layer][u.plant.unit]) <= slots
             for u in planted.default_units]
    hits = [index[a[u.plant.layer][over][:, u.plant.unit].argmax()] == u.plant.image for u in planted.default_units]
    assert planted.recall == np.mean(found) == 1.0
    assert planted.argmax_hits == sum(hits) == 8

    # the pooled membership test: planted images against the other held-out images, over both layers
    pooled = np.flatnonzero(np.isin(labels, (PLANTED, HOLDOUT)))
    is_planted = labels[pooled] == PLANTED
    counts = np.zeros(pooled.size)
    for matrix in a.values():
        m = matrix[pooled]
        picks = m.max(axis=0) - m.mean(axis=0) > 1e-5 * m.max(axis=0)
        counts += np.bincount(m.argmax(axis=0)[picks], minlength=pooled.size)
    observed = counts[is_planted].sum()
    rng = np.random.default_rng(123)
    null = np.array([counts[rng.permutation(pooled.size)[: is_planted.sum()]].sum() for _ in range(2000)])
    p = (1 + np.count_nonzero(null >= observed)) / 2001
    assert planted.membership.member_share == pytest.approx(observed / counts.sum())
    noise = 4 * math.sqrt(max(p, 1 / 2001) * (1 - p) / 2000)
    assert abs(planted.membership.p_value - p) <= noise + 1 / 2001
