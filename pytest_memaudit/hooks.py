"""Forward hooks that reduce each audited layer's output to one number per unit, at once.

The reduction (mean of |a| over space) runs inside the hook, on the device, so full activation
maps are never kept and later in-place ops (VAR's SiLU after ``norm_out``) cannot change what
was measured.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import torch

from .errors import AuditError
from .models import LayerSpec


def unit_means(output: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, units) float32: mean |activation| per unit over its spatial or token positions.

    4-D outputs are (batch, channels, H, W); 3-D outputs are (batch, tokens, channels), as
    transformer blocks give; 2-D outputs are already one number per unit. ``out``, if given,
    receives the result.

    On a GPU the sum of |a| is one pass over the activation (an L1 norm, added up in float32
    as a tree), where ``abs()`` then ``mean()`` would write and read back a full copy. On the
    CPU, PyTorch's L1 norm adds its float32 terms one after another (relative error 4e-6 over
    64x64 positions, 1e-5 over 256x256, against 2e-7 for ``mean``'s pairwise sum), and there
    the forward passes take about 98% of the time anyway, so the CPU keeps ``abs().mean()``.
    """
    if output.dim() in (3, 4):
        dims = (2, 3) if output.dim() == 4 else (1,)
        if output.device.type == "cpu":
            return torch.mean(output.abs(), dim=dims, dtype=torch.float32, out=out)
        return _mean_abs_one_pass(output, dims, out)
    if output.dim() == 2:
        return output.abs().float() if out is None else out.copy_(output).abs_()
    raise AuditError(f"cannot audit an output of shape {tuple(output.shape)}: expected 2, 3 or 4 dimensions")


def _mean_abs_one_pass(output: torch.Tensor, dims: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    sums = torch.linalg.vector_norm(output, ord=1, dim=dims, dtype=torch.float32, out=out)
    return sums.div_(math.prod(output.shape[d] for d in dims))


def unit_axis(output: torch.Tensor) -> int:
    """The axis of ``output`` that holds the units, by the convention of ``unit_means``."""
    return 2 if output.dim() == 3 else 1


class LayerRecorder:
    """Attach to ``layers`` of ``model``; after each forward, ``take()`` gives {name: (batch, units)}.

    The tensors ``take()`` gives are the recorder's own, reused by the next forward: copy what
    must outlive it. Results allocated afresh during every pass would stay alive among the pass's
    freed activations and fragment the CPU heap, so that peak memory crept up over a long audit.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[LayerSpec]):
        modules = dict(model.named_modules())
        self._handles = []
        self._outputs: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        try:
            for layer in layers:
                module = modules.get(layer.module)
                if module is None:
                    close = difflib.get_close_matches(layer.module, list(modules), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise AuditError(
                        f"layer {layer.name!r}: the model has no module {layer.module!r}.{hint} "
                        "List module paths with model.named_modules()."
                    )
                self._handles.append(module.register_forward_hook(self._hook(layer.name)))
        except BaseException:
            self.close()
            raise

    def _hook(self, name: str):
        def record(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            buffer = self._buffers.get(name)
            if buffer is None or len(buffer) < len(output) or buffer.device != output.device:
                # The first pass, or a larger batch: allocate this layer's result once more.
                self._outputs[name] = self._buffers[name] = unit_means(output)
            else:
                self._outputs[name] = unit_means(output, out=buffer[: len(output)])

        return record

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self._outputs = self._outputs, {}
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
