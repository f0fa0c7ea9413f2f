"""The encoder of VAR's VQVAE tokenizer (``var_d16``) and its checkpoint loading.

The architecture and checkpoint format follow ``shared/spec/var_d16.md``. Module names match
the released checkpoint's ``encoder.*`` keys, so ``named_modules()`` gives the audited layer
paths of ``var_layer_specs()``. A checkpoint is untrusted input: it is read with
``weights_only=True`` and every problem becomes a ``CheckpointError`` that says how to fix it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

CHECKPOINT_NAME = "vae_ch160v4096z32.pth"
HF_REPO_DIR = "models--FoundationVision--var"
ENV_VAR = "MEMAUDIT_CHECKPOINT"

# Parts of the whole-VQVAE checkpoint that an encoder audit ignores.
_OTHER_VQVAE_PARTS = ("decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A plain attribute (not a module) when unused, so named_modules() matches the checkpoint.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the HxW positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        # SDPA's default scale is C^-0.5, as in the reference.
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(attended.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    """One resolution level: residual blocks (each followed by attention if any), then a downsample."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, with_downsample: bool
    ):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        if with_attn:
            self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks))
        else:
            self.attn = None
        self.downsample = Downsample(out_channels) if with_downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn is not None:
                h = self.attn[j](h)
        if self.downsample is not None:
            h = self.downsample(h)
        return h


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VAREncoder(nn.Module):
    """VAR's VQVAE encoder; the defaults are those of ``vae_ch160v4096z32.pth``.

    Attention runs at the last level only (and in the middle). ``ch`` must be a multiple of 32
    (GroupNorm with 32 groups).
    """

    def __init__(
        self,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 32,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        last = len(ch_mult) - 1
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList(
            DownLevel(
                ch * in_mult[i], ch * ch_mult[i], num_res_blocks, with_attn=i == last, with_downsample=i < last
            )
            for i in range(len(ch_mult))
        )
        top = ch * ch_mult[-1]
        self.mid = MidBlock(top)
        self.norm_out = _group_norm(top)
        self.conv_out = nn.Conv2d(top, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.norm_out(h)
        # In place, as in the reference: a hook that keeps norm_out's output sees post-SiLU values.
        h = F.silu(h, inplace=True)
        return self.conv_out(h)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def _preview(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _refused_reason(message: str, path: Path) -> str | None:
    """Why torch's weights-only unpickler refused a real pickle; None if the file is no pickle."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it contains the Python object {found.group(1).rstrip('.')}, which is not a tensor"
    with path.open("rb") as f:
        header = f.read(2)
    is_pickle = len(header) == 2 and header[0] == 0x80 and 2 <= header[1] <= 5  # PROTO opcode
    if "Weights only load failed" in message and is_pickle:
        return "it is a plain pickle (written with pickle, not torch.save) that the safe loader cannot read"
    return None


def load_checkpoint_file(path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and return its flat dict of tensors.

    A file whose top level is a dict holding a ``state_dict`` or ``model`` entry that is itself a
    dict of tensors (a common training-checkpoint layout) is unwrapped; the other entries of such
    a file are ignored.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint file {path} does not exist. Check the path (relative paths are taken from "
            f"the current directory, {Path.cwd()})."
        )
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint path {path} is a directory, not a file. Give the path of the .pth file "
            f"itself (for var_d16: {path / CHECKPOINT_NAME} if it is in there)."
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"checkpoint file {path} is empty (0 bytes): it was probably not saved or downloaded "
            "completely. Download or save it again."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _refused_reason(str(exc), path)
        if reason is None:
            raise _corrupt(path, size) from None
        raise CheckpointError(
            f"checkpoint file {path} is refused by the safe loader (torch.load with "
            f"weights_only=True): {reason}. Loading it without that protection could run arbitrary "
            "code, so memaudit does not. If you trust its source, load it yourself and re-save the "
            "weights as a plain state_dict: torch.save(model.state_dict(), 'weights.pth'), then "
            "audit that file."
        ) from None
    except PermissionError:
        raise CheckpointError(
            f"checkpoint file {path} cannot be read: permission denied. Fix its permissions or copy "
            "it somewhere readable."
        ) from None
    except Exception:  # whatever garbage bytes make torch.load raise, the file is unusable
        raise _corrupt(path, size) from None
    return _tensor_dict(state, path)


def _corrupt(path: Path, size: int) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path} ({size:,} bytes) is truncated, corrupt or not a PyTorch checkpoint: "
        "torch.load cannot read it. If it was downloaded, the download was probably interrupted "
        f"(the released {CHECKPOINT_NAME} is about 436 MB); download it again. Otherwise "
        "re-save the weights with torch.save(model.state_dict(), path)."
    )


def _tensor_dict(state, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for wrapper in ("state_dict", "model"):
            inner = state.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                state = inner
                break
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint file {path} holds a {type(state).__name__}, not a state_dict (a dict of "
            "parameter names to tensors). Save the weights with torch.save(model.state_dict(), path)."
        )
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(
            f"checkpoint file {path} is a dict but not a state_dict: these entries are not "
            f"name -> tensor pairs: {_preview(bad)}. Save the weights with "
            "torch.save(model.state_dict(), path)."
        )
    return state


def encoder_state_dict(state: dict, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The encoder weights of ``state``, keyed as in ``model.state_dict()``, as float32.

    ``state`` may be the whole VQVAE (``encoder.*`` is used, ``decoder.*``, ``quantize.*``,
    ``quant_conv.*`` and ``post_quant_conv.*`` are ignored), an encoder-only dict with the
    ``encoder.`` prefix, or one without it. Other floating dtypes are converted to float32.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(k.startswith("encoder.") for k in state):
        prefix = "encoder."
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        prefix = ""
        found = {k: v for k, v in state.items() if not k.startswith(_OTHER_VQVAE_PARTS)}
        if not found.keys() & expected.keys():
            if len(found) < len(state):
                what = "has VQVAE parts but no encoder weights"
            else:
                what = "is not a VAR VQVAE checkpoint"
            has = f"it has {len(state)} keys such as {_preview(list(state), 5)}" if state else "it is empty"
            raise CheckpointError(
                f"checkpoint {source} {what}: none of its keys is an encoder weight (expected keys "
                f"like 'encoder.conv_in.weight' or 'conv_in.weight'; {has}). var_d16 needs "
                f"{CHECKPOINT_NAME} from the Hugging Face model repo FoundationVision/var."
            )

    missing = [k for k in expected if k not in found]
    unexpected = [prefix + k for k in found if k not in expected]
    misshaped = [
        f"{prefix}{k} (expected {_shape(shape)}, found {_shape(found[k].shape)})"
        for k, shape in expected.items()
        if k in found and tuple(found[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_preview(misshaped)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the {type(model).__name__} it is loaded into: "
            + "; ".join(problems)
            + ". Use the unmodified VQVAE checkpoint made for this encoder (for var_d16: "
            f"{CHECKPOINT_NAME} from FoundationVision/var), not one of another configuration."
        )

    not_float = [f"{prefix}{k} ({v.dtype})" for k, v in found.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"checkpoint {source} has non-floating-point encoder weights: {_preview(not_float)}. "
            "The file is damaged or not a VAR VQVAE checkpoint; use the released one."
        )
    weights = {k: found[k].to(torch.float32).contiguous() for k in expected}
    not_finite = [prefix + k for k, v in weights.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise CheckpointError(
            f"checkpoint {source} has NaN or infinite values in encoder weights: "
            f"{_preview(not_finite)}. The file is damaged (or was saved from a diverged "
            "training run); download or save it again."
        )
    return weights


# ---------------------------------------------------------------------------------------------
# Finding and building var_d16


def _hf_hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def locate_var_d16_checkpoint(explicit: str | None) -> Path:
    """Where ``vae_ch160v4096z32.pth`` is: the explicit path, ``$MEMAUDIT_CHECKPOINT``, or the HF cache.

    An explicit path (or the environment variable) that does not exist is an error rather than
    a reason to look elsewhere. A directory holding the file is accepted in their place. Nothing
    is downloaded.
    """
    for given, origin in ((explicit, "the checkpoint path given"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if not given:
            continue
        path = Path(given).expanduser()
        if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        if not path.exists():
            raise CheckpointError(
                f"{origin} ({path}) does not exist. Point it at the VAR VQVAE checkpoint "
                f"{CHECKPOINT_NAME} (about 436 MB, from the Hugging Face model repo "
                "FoundationVision/var)."
            )
        return path

    hub = _hf_hub_dir()
    snapshots = [p for p in (hub / HF_REPO_DIR / "snapshots").glob(f"*/{CHECKPOINT_NAME}") if p.is_file()]
    if snapshots:
        return max(snapshots, key=lambda p: p.parent.stat().st_mtime)
    raise CheckpointError(
        f"var_d16 needs the VAR VQVAE checkpoint {CHECKPOINT_NAME} (about 436 MB) from the Hugging "
        "Face model repo FoundationVision/var, and none was found. Pass --memaudit-checkpoint PATH, "
        f"or set {ENV_VAR}=PATH, or put it in the Hugging Face cache at "
        f"{hub / HF_REPO_DIR / 'snapshots' / '<revision>' / CHECKPOINT_NAME} (for instance with "
        f"`huggingface-cli download FoundationVision/var {CHECKPOINT_NAME}`). Nothing is downloaded "
        "automatically. To try the plugin without any download, use --memaudit-model demo."
    )


def build_var_d16(checkpoint: str | None) -> VAREncoder:
    """The var_d16 encoder in eval mode with the checkpoint's weights."""
    path = locate_var_d16_checkpoint(checkpoint)
    state = load_checkpoint_file(path)
    # Built on the meta device: no time spent initialising weights that are replaced at once.
    with torch.device("meta"):
        model = VAREncoder()
    model.load_state_dict(encoder_state_dict(state, model, str(path)), assign=True)
    return model.eval()
