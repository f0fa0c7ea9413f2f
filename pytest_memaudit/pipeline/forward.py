"""The model's forward pass: memory layout, the input its contract asks for, and a forward that halves its
batch on out-of-memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..controls.planted import PlantedRecorder
from ..errors import AuditError, user_code
from ..models import InputContract
from ..models.hooks import LayerRecorder
from .device import faster_layout, is_out_of_memory, precision_mode, time_precisions

# Weights and views in NHWC, the layout oneDNN and cuDNN convolutions run fastest in, for models
# whose input contract says they support it (InputContract.channels_last).
MEMORY_FORMAT = torch.channels_last


def memory_format(contract: InputContract) -> torch.memory_format:
    return MEMORY_FORMAT if contract.channels_last else torch.contiguous_format


def layout_name(layout: torch.memory_format) -> str:
    return "NCHW" if layout == torch.contiguous_format else "channels-last"


def prepare(net: torch.nn.Module, device: torch.device, layout: torch.memory_format) -> torch.nn.Module:
    with user_code("moving the model to its device"):
        return net.eval().requires_grad_(False).to(device, memory_format=layout)


def probe_layouts(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                  precision: str) -> tuple[torch.memory_format, dict[str, float]]:
    """Which memory layout runs ``net`` faster on ``device`` for inputs of ``shape``."""
    probe = torch.zeros(shape, device=device)

    def run(layout: torch.memory_format) -> None:
        net.to(memory_format=layout)(probe.contiguous(memory_format=layout))

    with torch.inference_mode(), precision_mode(precision, device):
        return faster_layout(run, device)


def precision_seconds(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                      layout: torch.memory_format) -> dict[str, float]:
    """A forward pass of ``net`` on random views of ``shape`` (a batch as the audit runs them) in float32
    and in bfloat16: bfloat16 is asked for because it should be faster, and on some CPUs it is not."""
    views = torch.rand(shape, generator=torch.Generator(device).manual_seed(0), device=device)
    views = views.mul_(2).sub_(1).contiguous(memory_format=layout)
    with torch.inference_mode(), user_code(f"the forward pass of the model on views of shape {tuple(shape)}"):
        return time_precisions(lambda: net(views), device)


def model_input(views: torch.Tensor, contract: InputContract,
                layout: torch.memory_format | None = None) -> torch.Tensor:
    """Views (n, 3, H, W) in [-1, 1], RGB, as the model takes them: its channels (luma for one) in its
    order, mapped to its input range or normalization, in its memory layout (``layout``, default the
    contract's). Every subject (the model and its controls) gets these same tensors."""
    views = contract.arrange(views)
    affine = contract.affine()
    if affine is not None:
        scale, shift = (torch.tensor(values, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
                        for values in affine)
        views = views.mul_(scale).add_(shift)
    return views.contiguous(memory_format=layout or memory_format(contract))


class AdaptiveForward:
    """Forward passes of at most ``size`` views, each layer's output reduced by the recorder's hooks.

    On out-of-memory the pass is retried with half as many views, and ``size`` stays halved for
    the batches after it; each halving is written to ``notes``. Every view goes through the
    encoder on its own (no layer mixes views), so the grouping changes nothing but rounding.
    """

    def __init__(self, size: int, device: torch.device, notes: list[str]):
        self.size = size
        self.device = device
        self.notes = notes

    def __call__(self, net: torch.nn.Module, recorder: LayerRecorder, views: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.with_riders(net, recorder, views, [])[0]

    def with_riders(self, net: torch.nn.Module, recorder: LayerRecorder, views: torch.Tensor,
                    riders: Sequence[PlantedRecorder]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The pass, and what each of ``riders`` (recorders on the same net) measured in it."""
        parts, rider_parts = [], [[] for _ in riders]
        start = 0
        while start < len(views):
            if self._runs(net, views[start : start + self.size]):
                part = recorder.take()
                start += self.size
                parts.append(part if start >= len(views) else {name: out.clone() for name, out in part.items()})
                for rider, kept in zip(riders, rider_parts):
                    kept.append(rider.take())
            else:
                recorder.take()  # the layers the failed pass reached
                for rider in riders:
                    rider.take()
                self._halve()
        return _joined(parts), [_joined(kept) for kept in rider_parts]

    @staticmethod
    def _runs(net: torch.nn.Module, views: torch.Tensor) -> bool:
        try:
            net(views)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return False  # handled outside the except block, once the failed pass's tensors are freed
        return True

    def _halve(self) -> None:
        if self.size == 1:
            raise AuditError(
                f"out of memory on {self.device} with a single view per forward pass; audit at a smaller "
                "--memaudit-image-size, with --memaudit-precision bfloat16, or on a device with more memory"
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.notes.append(
            f"out of memory on {self.device} at {self.size} views per forward pass: "
            f"halved to {self.size // 2} and retried (set --memaudit-batch-size to start there)"
        )
        self.size //= 2


def _joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
