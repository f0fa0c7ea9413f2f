"""Forward hooks that reduce each audited layer's output to one number per unit, at once.

The reduction (mean of |a| over every axis but the batch and the units) runs inside the hook, on
the device, so full activation maps are never kept and later in-place ops (VAR's SiLU after
``norm_out``) cannot change what was measured.

What is measured of a layer is settled at the first forward pass and never guessed: the part of
a tuple, list or dict output (``output:``), the call of a module that runs more than once per
pass (``call:``), and the axis that holds the units (``units:``, or inferred from the widths the
module's own submodules declare). Anything that does not settle it is an AuditError that names
the layer, what it saw and the key to set.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AuditError
from . import UNIT_LAYOUTS, LayerSpec

# Attributes by which a module declares the width of its output's unit axis.
WIDTH_ATTRIBUTES = ("out_channels", "out_features", "num_features", "num_channels", "normalized_shape")
# Modules whose output is (batch, channels, ...) by definition.
CHANNELS_FIRST = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                  torch.nn.ConvTranspose3d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                  torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
KEYS_HINT = (f"set 'units: {' | '.join(UNIT_LAYOUTS)}' or 'units_axis: N' (0 is the batch) for this layer in "
             "audited_layers")


@dataclass(frozen=True)
class UnitAxis:
    """How a layer's units were found: ``axis`` of the measured tensor, whose shape at the first
    batch (without the batch axis) was ``shape``; ``source`` says what settled it."""

    axis: int
    shape: tuple[int, ...]
    source: str

    @property
    def units(self) -> int:
        return self.shape[self.axis - 1]

    def describe(self) -> str:
        return f"axis {self.axis} of (B, {', '.join(map(str, self.shape))}): {self.source}"


def unit_means(output: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, units) float32: mean |activation| per unit (``axis``) over every other axis but the
    batch (axis 0). ``out``, if given, receives the result.

    On a GPU the sum of |a| is one pass over the activation (an L1 norm, added up in float32
    as a tree), where ``abs()`` then ``mean()`` would write and read back a full copy. On the
    CPU, PyTorch's L1 norm adds its float32 terms one after another (relative error 4e-6 over
    64x64 positions, 1e-5 over 256x256, against 2e-7 for ``mean``'s pairwise sum), and there
    the forward passes take about 98% of the time anyway, so the CPU keeps ``abs().mean()``.
    """
    if not 1 <= axis < output.dim():
        raise AuditError(f"cannot take units on axis {axis} of an output of shape {tuple(output.shape)}")
    dims = tuple(d for d in range(1, output.dim()) if d != axis)
    if not dims:
        return output.abs().float() if out is None else out.copy_(output).abs_()
    if output.device.type == "cpu":
        return torch.mean(output.abs(), dim=dims, dtype=torch.float32, out=out)
    return _mean_abs_one_pass(output, dims, out)


def _mean_abs_one_pass(output: torch.Tensor, dims: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    sums = torch.linalg.vector_norm(output, ord=1, dim=dims, dtype=torch.float32, out=out)
    return sums.div_(math.prod(output.shape[d] for d in dims))


def declared_widths(module: torch.nn.Module) -> list[tuple[str, int]]:
    """(attribute path, width) of every submodule of ``module`` (itself first) that declares one, in
    registration order."""
    widths = []
    for path, sub in module.named_modules():
        for attribute in WIDTH_ATTRIBUTES:
            value = getattr(sub, attribute, None)
            if attribute == "normalized_shape" and isinstance(value, (tuple, list)):
                value = value[0] if len(value) == 1 else None  # a norm over several axes has no one width
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                widths.append((f"{path}.{attribute}" if path else attribute, value))
                break
    return widths


def resolve_unit_axis(layer: LayerSpec, module: torch.nn.Module, shape: Sequence[int]) -> UnitAxis:
    """The unit axis of ``layer``'s measured tensor, of ``shape`` (batch first): from ``units:``; or
    the only axis besides the batch; or axis 1 of a convolution's or channel norm's own output; or
    the last declared width (``declared_widths``, last first) that matches exactly one axis.
    AuditError when nothing settles it."""
    shape = tuple(shape)
    shown = "(" + ", ".join(["batch", *map(str, shape[1:])]) + ("," if len(shape) == 1 else "") + ")"
    where = f"layer {layer.name!r} (module {layer.module!r}), output of shape {shown}"
    if len(shape) < 2:
        raise AuditError(f"{where}: no axis besides the batch holds units; audit a module whose output has one")
    units = layer.units
    if units is not None:
        if units == "channels_first":
            axis = 1
        elif units == "channels_last":
            axis = len(shape) - 1
        elif units == "token_channels":
            if len(shape) != 3:
                raise AuditError(f"{where}: 'units: token_channels' needs a (batch, tokens, channels) output; "
                                 f"{KEYS_HINT}")
            axis = 2
        else:
            axis = units + len(shape) if units < 0 else units
            if not 1 <= axis < len(shape):
                raise AuditError(f"{where}: units_axis {units} is not an axis of it besides the batch (1 to "
                                 f"{len(shape) - 1})")
        return UnitAxis(axis, shape[1:], f"units: {units}" if isinstance(units, str) else f"units_axis: {units}")
    if len(shape) == 2:
        return UnitAxis(1, shape[1:], "the only axis besides the batch")
    widths = [(f"{layer.module}.{attribute}" if layer.module else attribute, width)
              for attribute, width in declared_widths(module)]
    if isinstance(module, CHANNELS_FIRST) and layer.output is None and widths and widths[0][1] == shape[1]:
        return UnitAxis(1, shape[1:], f"a {type(module).__name__}'s output: {widths[0][0]} = {shape[1]}")
    for attribute, width in reversed(widths):
        matches = [axis for axis in range(1, len(shape)) if shape[axis] == width]
        if len(matches) == 1:
            if len(shape) == 3:
                _check_token_reading(where, matches[0], f"{attribute} = {width}", widths, shape)
            return UnitAxis(matches[0], shape[1:], f"inferred from {attribute} = {width}")
        if matches:
            raise AuditError(f"{where}: its width {width} ({attribute}) matches axes {matches}, so the unit axis "
                             f"is ambiguous; {KEYS_HINT}")
    found = ", ".join(f"{attribute} = {width}" for attribute, width in widths[-3:])
    why = (f"none of its declared widths ({found}) matches an axis" if widths else
           f"the module declares no width ({', '.join(WIDTH_ATTRIBUTES)})")
    raise AuditError(f"{where}: cannot tell which axis holds the units: {why}; {KEYS_HINT}")


def _check_token_reading(where: str, axis: int, reading: str, widths: list[tuple[str, int]],
                         shape: tuple[int, ...]) -> None:
    """A (batch, tokens, channels) output whose inferred unit axis is the tokens' (a token-mixing layer
    declares the token count as its width), or whose declared widths read both ways: ask, never guess."""
    hint = "say which with 'units: token_channels' (axis 2) or 'units_axis: 1' for this layer in audited_layers"
    if axis != 2:
        raise AuditError(f"{where}: {reading} would put the units on axis 1, the tokens of a (batch, tokens, "
                         f"channels) layout, as a token-mixing layer's width does; {hint}")
    tokens = [f"{attribute} = {width}" for attribute, width in widths if width == shape[1] != shape[2]]
    if tokens:
        raise AuditError(f"{where}: two readings are plausible: {reading} puts the units on axis 2 (channels), "
                         f"{tokens[-1]} on axis 1 (tokens); {hint}")


def describe_output(output) -> str:
    """What a module returned, for messages: a tensor's shape, or a container's parts and theirs."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        parts = [f"{key!r}: {_short(value)}" for key, value in output.items()]
        return f"a {type(output).__name__} with " + ", ".join(parts)
    if isinstance(output, (tuple, list)):
        parts = [f"[{i}] {_short(value)}" for i, value in enumerate(output)]
        return f"a {type(output).__name__} of {len(output)}: " + ", ".join(parts)
    return f"a {type(output).__name__}"


def _short(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def output_part(output, layer: LayerSpec) -> torch.Tensor:
    """The tensor of ``output`` that ``layer`` measures: the output itself, or its ``output:`` part."""
    where = f"layer {layer.name!r} (module {layer.module!r})"
    if isinstance(output, torch.Tensor):
        if layer.output is not None:
            raise AuditError(f"{where} returns a single tensor of shape {tuple(output.shape)}; remove 'output: "
                             f"{layer.output}'")
        return output
    if not isinstance(output, (Mapping, tuple, list)):
        raise AuditError(f"{where} returns {describe_output(output)}, not a tensor")
    if layer.output is None:
        raise AuditError(f"{where} returns {describe_output(output)}; say which part to measure with 'output: "
                         f"{'KEY' if isinstance(output, Mapping) else 'N'}' in audited_layers")
    try:
        part = output[layer.output]
    except (KeyError, IndexError, TypeError):
        raise AuditError(f"{where}: 'output: {layer.output}' is not a part of what it returns, "
                         f"{describe_output(output)}") from None
    if not isinstance(part, torch.Tensor):
        raise AuditError(f"{where}: its output part {layer.output!r} is {describe_output(part)}, not a tensor")
    return part


def with_part(output, layer: LayerSpec, tensor: torch.Tensor):
    """``output`` with the part ``layer`` measures replaced by ``tensor`` (for hooks that change it)."""
    if layer.output is None:
        return tensor
    if isinstance(output, tuple):
        return tuple(tensor if i == layer.output else part for i, part in enumerate(output))
    replaced = output.copy()
    replaced[layer.output] = tensor
    return replaced


def measured_tokens(tensor: torch.Tensor, layer: LayerSpec, axis: int) -> torch.Tensor:
    """The token positions ``layer`` measures (``tokens:``) of a (batch, tokens, units) tensor."""
    if layer.tokens == "all":
        return tensor
    if tensor.dim() != 3 or axis != 2 or tensor.shape[1] < 2:
        raise AuditError(f"layer {layer.name!r} (module {layer.module!r}): 'tokens: {layer.tokens}' needs a (batch, "
                         f"tokens, units) output with at least 2 tokens, got shape {tuple(tensor.shape)} with units "
                         f"on axis {axis}")
    return tensor[:, :1] if layer.tokens == "cls" else tensor[:, 1:]


def find_module(model: torch.nn.Module, layer: LayerSpec, modules: dict[str, torch.nn.Module] | None = None
                ) -> torch.nn.Module:
    """The module of ``layer``, or an AuditError with the closest module path."""
    modules = modules if modules is not None else dict(model.named_modules())
    module = modules.get(layer.module)
    if module is None:
        close = difflib.get_close_matches(layer.module, list(modules), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AuditError(
            f"layer {layer.name!r}: the model has no module {layer.module!r}.{hint} "
            "List module paths with pytest --memaudit-list-layers (or model.named_modules())."
        )
    return module


class LayerRecorder:
    """Attach to ``layers`` of ``model``; after each forward, ``take()`` gives {name: (batch, units)}.

    A forward pass of ``model`` is one pass: a pre-hook on ``model`` starts it, a hook ends it.
    The first pass settles each layer's unit axis (``axes``) and the order of their measured calls
    (``ordered``), and checks how often each module ran; every problem it finds is raised at its
    end, together, as one AuditError.

    The tensors ``take()`` gives are the recorder's own, reused by the next forward: copy what
    must outlive it. Results allocated afresh during every pass would stay alive among the pass's
    freed activations and fragment the CPU heap, so that peak memory crept up over a long audit.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[LayerSpec]):
        modules = dict(model.named_modules())
        self.layers = {layer.name: layer for layer in layers}
        self.axes: dict[str, UnitAxis] = {}
        self._handles = []
        self._outputs: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._first_pass = True
        self._sequence: dict[str, int] = {}  # at the first pass: the order of each layer's measured call
        self._problems: dict[str, str] = {}
        self._batch = 0
        try:
            targets = [(layer, find_module(model, layer, modules)) for layer in layers]
            self._handles.append(model.register_forward_pre_hook(self._start_pass, prepend=True))
            for layer, module in targets:
                self._handles.append(module.register_forward_hook(self._hook(layer)))
            self._handles.append(model.register_forward_hook(self._end_pass))
        except BaseException:
            self.close()
            raise

    def _start_pass(self, module, args) -> None:
        self._calls.clear()
        self._outputs.clear()
        first = args[0] if args else None
        self._batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 0

    def _hook(self, layer: LayerSpec):
        name = layer.name

        def record(module, inputs, output):
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if layer.call not in (None, "all") and call != layer.call:
                return
            if self._first_pass:
                if name in self._problems:
                    return
                try:
                    tensor = self._settle(layer, module, output)
                except AuditError as exc:
                    self._problems[name] = str(exc)
                    return
                self._sequence.setdefault(name, len(self._sequence))
            else:
                tensor = output_part(output, layer)
            axis = self.axes[name].axis
            tensor = measured_tokens(tensor, layer, axis)
            if layer.call == "all" and call > 0:
                self._outputs[name].add_(unit_means(tensor, axis))
                return
            buffer = self._buffers.get(name)
            if buffer is None or len(buffer) < len(tensor) or buffer.device != tensor.device:
                # The first pass, or a larger batch: allocate this layer's result once more.
                self._outputs[name] = self._buffers[name] = unit_means(tensor, axis)
            else:
                self._outputs[name] = unit_means(tensor, axis, out=buffer[: len(tensor)])

        return record

    def _settle(self, layer: LayerSpec, module: torch.nn.Module, output) -> torch.Tensor:
        tensor = output_part(output, layer)
        if self._batch and (tensor.dim() == 0 or tensor.shape[0] != self._batch):
            raise AuditError(f"layer {layer.name!r} (module {layer.module!r}): its output of shape "
                             f"{tuple(tensor.shape)} does not have the batch ({self._batch} views) on axis 0; audit "
                             "a module whose output is batch-first")
        settled = self.axes.get(layer.name)
        if settled is None:
            self.axes[layer.name] = resolve_unit_axis(layer, module, tensor.shape)
        elif layer.call == "all" and (tensor.dim() != len(settled.shape) + 1
                                      or tensor.shape[settled.axis] != settled.units):
            call = self._calls[layer.name] - 1
            raise AuditError(f"layer {layer.name!r} (module {layer.module!r}) has 'call: all', but its calls differ in "
                             f"shape: call 0 gave (batch, {', '.join(map(str, settled.shape))}), call {call} "
                             f"{tuple(tensor.shape)}, so their units cannot be averaged. Measure one call with 'call: "
                             "N', or each call as a layer of its own (the same module, with call: 0, call: 1, ...)")
        return tensor

    def _end_pass(self, module, args, output) -> None:
        for name, layer in self.layers.items():
            if layer.call == "all" and self._calls.get(name, 0) > 1 and name in self._outputs:
                self._outputs[name].div_(self._calls[name])
        if not self._first_pass:
            return
        self._first_pass = False
        problems = list(self._problems.values())
        for name, layer in self.layers.items():
            calls = self._calls.get(name, 0)
            where = f"layer {name!r} (module {layer.module!r})"
            if not calls:
                problems.append(f"{where} never runs in the model's forward pass, so it has no output to measure (a "
                                "module the model holds without calling it, such as nn.MultiheadAttention's out_proj, "
                                "whose weights the attention uses directly); audit a module that runs (pytest "
                                "--memaudit-list-layers marks the others 'not run')")
            elif calls > 1 and layer.call is None:
                problems.append(f"{where} runs {calls} times per forward pass; measure one call with 'call: N' "
                                f"(0 to {calls - 1}) or their mean with 'call: all'")
            elif isinstance(layer.call, int) and calls and layer.call >= calls:
                problems.append(f"{where} has 'call: {layer.call}' but runs {calls} time(s) per forward pass")
        if problems:
            raise AuditError("; ".join(problems) if len(problems) == 1 else
                             f"{len(problems)} audited layers cannot be measured as declared:\n- " + "\n- ".join(problems))

    def ordered(self, layers: Sequence[LayerSpec]) -> list[LayerSpec]:
        """``layers`` by their measured call at the first pass (forward order); any that never ran last."""
        return sorted(layers, key=lambda layer: self._sequence.get(layer.name, len(self._sequence)))

    def take(self) -> dict[str, torch.Tensor]:
        """The last pass's (batch, units) per layer, in forward order."""
        outputs, self._outputs = self._outputs, {}
        return {name: outputs[name] for name in sorted(outputs, key=lambda n: self._sequence.get(n, 0))}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
