"""The planted positive control: chosen units of the audited model made to memorize chosen
held-out images, measured in the model's own forward pass, to show what the audit can detect.

Each planted unit is given an implant: when the planted layer's own input (what the network
computed up to that layer) matches one of its image's views, the unit's measured output gets a
constant added, equal to (strength - 1) times the unit's mean |activation|, so that the image's
activation is about ``strength`` times the unit's mean and every other image's is unchanged.
Matching is by a sketch of the layer's input (``sketch``) compared by cosine similarity with the
sketches of the image's own views, recorded by a forward pass over them before the audit. So the
implant recognises an image only through features the network computes: a network blind to its
input computes the same features for every image, its planted units respond alike to all of them,
and the control is not found there.

The implants change nothing the model computes: ``PlantedRecorder`` rides on the model's forward
pass and measures the planted units (their output plus the implant) for the planted control only;
every other unit of the control is the model's own. The control then goes through the same
streaming state, statistics and verdict as the model.

Units at the default strength (one per planted image) measure the audit's recall; a few units
at lower strengths, in the same pass, trace the detection curve: the strength at which this
audit, at this N and number of views, finds a memorizing unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metric.membership import CONSTANT_TOLERANCE, Membership
from ..metric.unitmem import UnitMemValues
from ..metric.verdict import Verdict
from ..models import LayerSpec
from ..models.hooks import LayerRecorder, UnitAxis, find_module, measured_tokens, output_part, unit_means

DEFAULT_UNITS = 16  # planted images, one default-strength unit each
DEFAULT_STRENGTH = 8.0  # the planted image's activation over the unit's mean
CURVE_STRENGTHS = (1.5, 2.0, 3.0, 5.0)  # further units, at these strengths, for the detection curve
CURVE_UNITS = 4  # units per curve strength
TOP_SHARE = 0.05  # a planted unit is found when its UnitMem is in this top share of all units
# A view's match with its planted image: none while its sketch's cosine with the image's views is
# below 1 - MATCH_TOLERANCE, full from 1 - MATCH_TOLERANCE / 2 (the image's own views: 1 up to rounding).
MATCH_TOLERANCE = 1e-3
SKETCH_SIZE = 1024  # a layer input's sketch: its values averaged down to at most this many


@dataclass(frozen=True)
class PlantedUnit:
    layer: str  # display name
    unit: int
    image: int  # global data point index of the planted image
    strength: float  # nominal: the planted image's activation over the unit's mean
    scale: float  # the unit's mean |activation| over the planted images' views, before planting


@dataclass
class PlantedUnitResult:
    plant: PlantedUnit
    unitmem: float
    rank: int  # among the copy's natural units and this one: 1 = above every natural unit
    found: bool  # ranks in the top TOP_SHARE of the natural units
    argmax_hit: bool  # its argmax is its planted image
    measured_strength: float  # the image's activation over the mean of the rest (NaN: not in the unit's top-k)


@dataclass
class PlantedResult:
    units: list[PlantedUnitResult]
    strength: float  # the default strength
    top_share: float
    membership: Membership | None = None
    curve: list[dict] = field(default_factory=list)  # per strength: units, recall, argmax_hits, measured strength
    verdict: Verdict | None = None  # the model's rule on the planted subject's tests: was it detected?

    @property
    def default_units(self) -> list[PlantedUnitResult]:
        return [u for u in self.units if u.plant.strength == self.strength]

    @property
    def recall(self) -> float:
        units = self.default_units
        return sum(u.found for u in units) / len(units) if units else math.nan

    @property
    def argmax_hits(self) -> int:
        return sum(u.argmax_hit for u in self.default_units)

    @property
    def images(self) -> list[int]:
        return sorted({u.plant.image for u in self.default_units})

    @property
    def detection_strength(self) -> float | None:
        """The lowest strength whose units were found at least 90% of the time."""
        found = [point["strength"] for point in self.curve if point["recall"] >= 0.9]
        return min(found) if found else None


def choose_plants(
    unit_scales: dict[str, np.ndarray], images: Sequence[int], strength: float, seed: int
) -> list[PlantedUnit]:
    """One unit per image at ``strength`` and CURVE_UNITS per curve strength (images reused in
    turn), spread evenly over the layers of ``unit_scales`` (name -> each unit's mean |activation|,
    in forward order). Units are drawn (seeded) among the live ones, never twice; a layer without
    a free live unit passes its plant to the next layer that has one."""
    rng = np.random.default_rng([seed, 0x9A17])
    names = list(unit_scales)
    free = {name: list(rng.permutation(np.flatnonzero(unit_scales[name] > 0))) for name in names}
    default = [(strength, image) for image in images]
    curve = [(s, images[j % len(images)]) for s in CURVE_STRENGTHS for j in range(CURVE_UNITS)]
    plants = []
    for group in (default, curve):  # each spread over all layers
        for j, (s, image) in enumerate(group):
            start = j * len(names) // len(group)
            for name in names[start:] + names[:start]:
                if free[name]:
                    unit = int(free[name].pop())
                    plants.append(PlantedUnit(name, unit, image, s, float(unit_scales[name][unit])))
                    break
    order = {name: i for i, name in enumerate(names)}
    return sorted(plants, key=lambda p: (order[p.layer], p.unit))


def plantable(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """The layers that can carry planted units: all but those measured as the mean of every call
    (``call: all``), whose calls see different inputs."""
    return [layer for layer in layers if layer.call != "all"]


def sketch(inputs: tuple) -> torch.Tensor | None:
    """(views, features) float32: a layer input (its first tensor argument) averaged down to at most
    SKETCH_SIZE values per view, centred, unit-length rows; None when the layer gets no tensor."""
    tensor = next((value for value in inputs if isinstance(value, torch.Tensor) and value.dim() >= 1), None)
    if tensor is None:
        return None
    flat = tensor.detach().float().flatten(1) if tensor.dim() > 1 else tensor.detach().float()[:, None]
    if flat.shape[1] > SKETCH_SIZE:
        flat = F.adaptive_avg_pool1d(flat[:, None], SKETCH_SIZE)[:, 0]
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _Calls:
    """Which call of each layer's module a forward pass is at (``call: N`` measures one of them)."""

    def __init__(self, net: nn.Module):
        self.counts: dict[str, int] = {}
        self.handle = net.register_forward_pre_hook(lambda module, args: self.counts.clear(), prepend=True)

    def measured(self, layer: LayerSpec) -> bool:
        call = self.counts.get(layer.name, 0)
        self.counts[layer.name] = call + 1
        return layer.call is None or call == layer.call


class InputSketches:
    """Records the sketch of each of ``layers``' input at its measured call, pass after pass
    (``take()`` gives them, (views, features) per layer, and starts over)."""

    def __init__(self, net: nn.Module, layers: Sequence[LayerSpec]):
        modules = dict(net.named_modules())
        self._calls = _Calls(net)
        self._handles = [self._calls.handle]
        self._taken: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
        for layer in layers:
            self._handles.append(find_module(net, layer, modules).register_forward_hook(self._hook(layer)))

    def _hook(self, layer: LayerSpec):
        def record(module, inputs, output):
            if self._calls.measured(layer):
                found = sketch(inputs)
                if found is not None:
                    self._taken[layer.name].append(found)

        return record

    def take(self) -> dict[str, torch.Tensor]:
        taken = {name: torch.cat(parts) for name, parts in self._taken.items() if parts}
        self._taken = {name: [] for name in self._taken}
        return taken

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PlantedRecorder:
    """The planted control's recorder, on the model's own modules: at each planted layer, a hook
    matches the layer's input against the sketches of the planted images' views (``prototypes``:
    name -> (images, views, features)) and measures the planted units of the output as the model's
    recorder would (``axes``), with the implant added. ``take()`` gives {name: (batch, planted units)};
    ``combine`` puts them into a copy of the model's measurements of the same pass."""

    def __init__(self, net: nn.Module, plants: Sequence[PlantedUnit], layers: Sequence[LayerSpec],
                 prototypes: dict[str, torch.Tensor], image_slots: dict[int, int], axes: dict[str, UnitAxis]):
        modules = dict(net.named_modules())
        by_name = {layer.name: layer for layer in layers}
        self._calls = _Calls(net)
        self._handles = [self._calls.handle]
        self._outputs: dict[str, torch.Tensor] = {}
        self.units: dict[str, torch.Tensor] = {}
        self.axes = dict(axes)  # as the model's recorder settled them
        for name in dict.fromkeys(plant.layer for plant in plants):
            mine = [p for p in plants if p.layer == name]
            self.units[name] = torch.tensor([p.unit for p in mine])
            slots = torch.tensor([image_slots[p.image] for p in mine])
            amounts = torch.tensor([(p.strength - 1) * p.scale for p in mine])
            hook = self._respond(by_name[name], axes[name].axis, prototypes[name], self.units[name], slots, amounts)
            self._handles.append(find_module(net, by_name[name], modules).register_forward_hook(hook))

    def _respond(self, layer: LayerSpec, axis: int, prototypes: torch.Tensor, units: torch.Tensor,
                 slots: torch.Tensor, amounts: torch.Tensor):
        def hook(module, inputs, output):
            if not self._calls.measured(layer):
                return
            views = sketch(inputs)
            cosine = torch.einsum("bd,ivd->biv", views, prototypes.to(views.device)).amax(dim=2)
            weights = ((cosine - (1 - MATCH_TOLERANCE)) / (MATCH_TOLERANCE / 2)).clamp(0, 1)
            tensor = measured_tokens(output_part(output, layer), layer, axis)
            planted = tensor.index_select(axis, units.to(tensor.device))
            delta = weights[:, slots.to(weights.device)] * amounts.to(weights.device)  # (batch, planted units)
            shape = [planted.shape[0]] + [1] * (planted.dim() - 1)
            shape[axis] = planted.shape[axis]
            self._outputs[layer.name] = unit_means(planted + delta.view(shape).to(planted.dtype), axis)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self._outputs = self._outputs, {}
        return outputs

    def combine(self, model: dict[str, torch.Tensor], planted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The planted control's (batch, units) per layer: the model's, with the planted units' columns
        replaced by ``planted`` (a ``take()`` of the same pass)."""
        combined = {}
        for name, values in model.items():
            if name in planted:
                values = values.clone()
                values[:, self.units[name].to(values.device)] = planted[name].to(values.dtype)
            combined[name] = values
        return combined

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def evaluate(plants: Sequence[PlantedUnit], layers: dict[str, UnitMemValues], strength: float,
             membership: Membership | None) -> PlantedResult:
    """Recall, argmax hits and the detection curve of the planted copy's finished values.

    A planted unit is found when it ranks among the top TOP_SHARE of the copy's natural units
    (those not planted), itself added: the question is whether a memorizing unit stands out from
    the units the model has, not from the other planted ones."""
    natural = np.sort(np.concatenate([
        np.delete(values.unitmem, [p.unit for p in plants if p.layer == name]) for name, values in layers.items()
    ]))[::-1]
    slots = max(1, math.ceil(TOP_SHARE * natural.size))
    results = []
    for plant in plants:
        values = layers[plant.layer]
        unitmem = float(values.unitmem[plant.unit])
        rank = 1 + int(np.count_nonzero(natural >= unitmem))
        in_top = values.top_samples[:, plant.unit] == plant.image
        activation = float(values.top_values[in_top, plant.unit][0]) if in_top.any() else math.nan
        rest, top = float(values.mu_rest[plant.unit]), float(values.mu_max[plant.unit])
        picks = top - rest > CONSTANT_TOLERANCE * abs(top)  # a constant unit's argmax is a tie-break, not a hit
        results.append(PlantedUnitResult(
            plant, unitmem, rank, rank <= slots,
            bool(picks and values.max_sample[plant.unit] == plant.image), activation / rest if rest > 0 else math.nan,
        ))
    result = PlantedResult(results, strength, TOP_SHARE, membership)
    for s in sorted({p.strength for p in plants}):
        group = [r for r in results if r.plant.strength == s]
        measured = [r.measured_strength for r in group if math.isfinite(r.measured_strength)]
        result.curve.append({
            "strength": s,
            "units": len(group),
            "recall": sum(r.found for r in group) / len(group),
            "argmax_hits": sum(r.argmax_hit for r in group),
            "measured_strength": float(np.median(measured)) if measured else None,
        })
    return result
