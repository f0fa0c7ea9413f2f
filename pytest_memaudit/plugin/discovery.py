"""``pytest --memaudit-list-layers``: a model's modules in forward order, with what an audit of
each would measure (output shape, unit axis as it would be inferred, units, calls per pass)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AuditError, user_code
from ..models import LayerSpec, ModelSpec
from ..models.hooks import describe_output, output_part, resolve_unit_axis
from ..pipeline.device import resolve_device
from ..pipeline.forward import memory_format, model_input, prepare
from ..pipeline.settings import RunSettings

LISTED_VIEWS = 2  # views in the listing's forward pass


@dataclass
class ModuleRecord:
    """One module as one forward pass saw it: at its first call, or at the call its audit measures (``call: N``)."""

    path: str
    kind: str  # its class
    calls: int = 0
    output: str = ""  # a tensor's shape, batch first, or a container's parts
    unit_axis: str = ""  # the axis an audit would infer, with its source; or what to set
    units: int | None = None


def survey(net: torch.nn.Module, views: torch.Tensor, layers: Sequence[LayerSpec] = ()) -> list[ModuleRecord]:
    """Every submodule of ``net``: those that ran in one forward pass of ``views``, by first call,
    then those that did not run. A module of ``layers`` is described as its audit measures it
    (its ``units``, ``output`` and ``tokens`` keys); any other as a plain module path would be."""
    audited = {layer.module: layer for layer in layers}
    records = {path: ModuleRecord(path, type(module).__name__) for path, module in net.named_modules() if path}
    order: list[str] = []

    def hook(path: str):
        def record(module, inputs, output):
            entry = records[path]
            call, entry.calls = entry.calls, entry.calls + 1
            if not call:
                order.append(path)
            layer = audited.get(path, LayerSpec(path, path))
            if call != (layer.call if isinstance(layer.call, int) else 0):
                return
            if not isinstance(output, torch.Tensor):
                entry.output = describe_output(output)
                if layer.output is None:
                    entry.unit_axis = "- (needs output:)" if isinstance(output, (tuple, list, Mapping)) else "-"
                    return
            try:
                tensor = output_part(output, layer)
                entry.output = entry.output or str(tuple(tensor.shape))
                axis = resolve_unit_axis(layer, module, tensor.shape)
            except AuditError:
                entry.unit_axis = "? (needs units:)"
                return
            entry.unit_axis = f"{axis.axis} ({axis.source.removeprefix('inferred from ').replace(path + '.', '', 1)})"
            entry.units = axis.units

        return record

    handles = [module.register_forward_hook(hook(path)) for path, module in net.named_modules() if path]
    try:
        net(views)
    finally:
        for handle in handles:
            handle.remove()
    return [records[path] for path in order] + [entry for entry in records.values() if not entry.calls]


def layer_table(spec: ModelSpec, settings: RunSettings) -> str:
    """The listing of ``spec``'s model (its weights as the audit would load them), as text."""
    device = resolve_device(settings.device)
    size = settings.image_size or spec.default_image_size
    net = prepare(spec.build(spec.locate(settings.checkpoint)), device, memory_format(spec.input_contract))
    pixels = torch.rand(LISTED_VIEWS, 3, size, size, generator=torch.Generator().manual_seed(settings.seed))
    views = model_input(pixels.to(device).mul_(2).sub_(1), spec.input_contract)
    with torch.inference_mode(), user_code(f"the forward pass of {spec.name} on views of shape {tuple(views.shape)}"):
        records = survey(net, views, spec.layers)
    audited = {layer.module: layer.name for layer in spec.layers}
    header = ("", "module", "type", "output", "unit axis (from)", "units", "calls")
    rows = [("*" if entry.path in audited else "", entry.path, entry.kind, entry.output or "-",
             entry.unit_axis or "-", "" if entry.units is None else str(entry.units), str(entry.calls or "not run"))
            for entry in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"memaudit: modules of {spec.name} in forward order, from one pass of {LISTED_VIEWS} views of {size}x{size} "
        f"({spec.input_contract.describe()}); * = audited. Axis 0 is the batch.",
        *("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]),
    ]
    return "\n".join(lines) + "\n"
