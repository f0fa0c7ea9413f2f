"""The planted positive control: a copy of the audited model in which chosen units memorize
chosen held-out images, audited in the same pass, to show what the audit can detect.

Each planted unit is given an implant: a forward hook that adds, to that unit's output, a
constant equal to (strength - 1) times the unit's mean |activation| whenever the input view is
one of its image's own augmented views, so that the image's activation is about ``strength``
times the unit's mean and every other image's is unchanged. A view is recognised by its
content alone (a small grey-level thumbnail, compared with the image's views by cosine
similarity), so the implant is a function of the input like any unit, and the whole pipeline
(views, hooks, streaming state, statistics) has to find it.

Units at the default strength (one per planted image) measure the audit's recall; a few units
at lower strengths, in the same pass, trace the detection curve: the strength at which this
audit, at this N and number of views, finds a memorizing unit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hooks import UnitAxis, output_part, with_part
from .membership import Membership
from .models import LayerSpec
from .unitmem import UnitMemValues
from .verdict import Verdict

DEFAULT_UNITS = 16  # planted images, one default-strength unit each
DEFAULT_STRENGTH = 8.0  # the planted image's activation over the unit's mean
CURVE_STRENGTHS = (1.5, 2.0, 3.0, 5.0)  # further units, at these strengths, for the detection curve
CURVE_UNITS = 4  # units per curve strength
TOP_SHARE = 0.05  # a planted unit is found when its UnitMem is in this top share of all units
# A view's match with its planted image: none while its thumbnail's cosine with the image's views is
# below 1 - MATCH_TOLERANCE, full from 1 - MATCH_TOLERANCE / 2 (the image's own views: 1 up to rounding).
MATCH_TOLERANCE = 1e-3
THUMBNAIL_SIDE = 8


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


def thumbnails(views: torch.Tensor) -> torch.Tensor:
    """(views, 3, H, W) -> (views, 3 * side^2): average-pooled, centred, unit-length rows."""
    small = F.adaptive_avg_pool2d(views.float(), THUMBNAIL_SIDE).flatten(1)
    small = small - small.mean(dim=1, keepdim=True)
    return small / small.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Implant:
    """The planted units' hooks on ``net``: a pre-hook matches each input view against the
    planted images' views, and a hook per planted layer adds the planted response to the tensor
    that layer's recorder measures (its ``output:`` part, at its ``call:``), along its unit axis
    as the model's recorder settled it (``axes``)."""

    def __init__(self, net: nn.Module, plants: Sequence[PlantedUnit], layers: Sequence[LayerSpec],
                 prototypes: torch.Tensor, image_slots: dict[int, int], axes: dict[str, UnitAxis]):
        self.prototypes = prototypes  # (images, views, features)
        self._match_weights: torch.Tensor | None = None
        self._calls: dict[str, int] = {}
        modules = dict(net.named_modules())
        by_name = {layer.name: layer for layer in layers}
        self._handles = [net.register_forward_pre_hook(self._match)]
        for name in dict.fromkeys(plant.layer for plant in plants):
            mine = [p for p in plants if p.layer == name]
            units = torch.tensor([p.unit for p in mine])
            slots = torch.tensor([image_slots[p.image] for p in mine])
            amounts = torch.tensor([(p.strength - 1) * p.scale for p in mine])
            hook = self._respond(by_name[name], axes[name].axis, units, slots, amounts)
            self._handles.append(modules[by_name[name].module].register_forward_hook(hook, prepend=True))

    def _match(self, module, args):
        self._calls.clear()
        views = thumbnails(args[0])
        prototypes = self.prototypes.to(views.device)
        cosine = torch.einsum("bd,ivd->biv", views, prototypes).amax(dim=2)
        self._match_weights = ((cosine - (1 - MATCH_TOLERANCE)) / (MATCH_TOLERANCE / 2)).clamp(0, 1)

    def _respond(self, layer: LayerSpec, axis: int, units: torch.Tensor, slots: torch.Tensor, amounts: torch.Tensor):
        def hook(module, inputs, output):
            call = self._calls.get(layer.name, 0)
            self._calls[layer.name] = call + 1
            if layer.call not in (None, "all") and call != layer.call:
                return None
            tensor = output_part(output, layer)
            weights = self._match_weights
            delta = torch.zeros(tensor.shape[0], tensor.shape[axis], device=tensor.device)
            delta[:, units.to(tensor.device)] = weights[:, slots.to(weights.device)] * amounts.to(weights.device)
            shape = [tensor.shape[0]] + [1] * (tensor.dim() - 1)
            shape[axis] = tensor.shape[axis]
            return with_part(output, layer, tensor + delta.view(shape).to(tensor.dtype))

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def planted_copy(model: nn.Module, plants: Sequence[PlantedUnit], layers: Sequence[LayerSpec],
                 prototypes: torch.Tensor, image_slots: dict[int, int], axes: dict[str, UnitAxis]) -> nn.Module:
    """A copy of ``model`` with the implants attached (they live as long as the copy); ``axes``:
    each layer's unit axis, as the model's recorder settled it."""
    net = copy.deepcopy(model)
    net._memaudit_implant = Implant(net, plants, layers, prototypes, image_slots, axes)
    return net


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
        rest = float(values.mu_rest[plant.unit])
        results.append(PlantedUnitResult(
            plant, unitmem, rank, rank <= slots,
            bool(values.max_sample[plant.unit] == plant.image), activation / rest if rest > 0 else math.nan,
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
