import contextlib
import io
import socket
import tarfile
import zlib

import numpy as np
import pytest
# pytester's in-process runs forget the modules first imported inside them, and numpy's and scipy's
# C extensions cannot be loaded twice. The audit imports scipy.stats only when it first computes a
# statistic (a second less before the first batch), so import it before any run, for every test file.
# The same for PyYAML: a run that first imports it leaves later runs' parser raising the forgotten
# copy's exceptions, which the audit file's `except yaml.YAMLError` no longer catches.
import scipy.stats  # noqa: F401
import yaml  # noqa: F401
from PIL import Image

from var_checkpoints import write_var_checkpoint


@contextlib.contextmanager
def on_one_thread():
    """Tiny tensors: a thread pool on a busy machine only waits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with on_one_thread():
        yield


def tiny_spec():
    """The tiny encoder (``tiny_encoder.py``) as a model spec, audited at 16x16."""
    from tiny_encoder import LAYERS, build

    from pytest_memaudit.models import LayerSpec, ModelSpec

    return ModelSpec(name="tiny", layers=tuple(LayerSpec(name, name) for name in LAYERS), build=build,
                     default_image_size=16)


@pytest.fixture(scope="session")
def var_checkpoint(tmp_path_factory):
    """A full-width var_d16 encoder checkpoint (random weights, manifest shapes)."""
    return write_var_checkpoint(tmp_path_factory.mktemp("ckpt") / "vae_ch160v4096z32.pth", "encoder", seed=0)


def make_images(directory, count, size=64, seed=0):
    """``count`` seeded random-texture PNGs of ``size`` x ``size`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.NEAREST)
        image.save(directory / f"img_{i:03d}.png")
    return directory


def activations(result, name: str) -> np.ndarray:
    """a[i, u] of every data point of a result's layer, from its top-k lists (k >= N keeps them all)."""
    values = result.layer(name).values
    a = np.full((len(result.samples), values.unitmem.size), np.nan)
    for row in range(values.top_samples.shape[0]):
        a[values.top_samples[row], np.arange(values.unitmem.size)] = values.top_values[row]
    assert not np.isnan(a).any()
    return a


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed, size=20):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder, shards, broken=()):
    """``shards``: {archive name: [keys]}; each key gets a .png and a .cls member (WebDataset style);
    keys in ``broken`` get a .png that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, keys in shards.items():
        with tarfile.open(folder / name, "w") as archive:
            for key in keys:
                image = b"not an image" if key in broken else png_bytes(zlib.crc32(key.encode()))
                add_member(archive, f"{key}.png", image)
                add_member(archive, f"{key}.cls", b"3")
    return folder


def tie_key(index):
    """The documented tie order (unitmem.tie_order), in Python integers: a splitmix-style hash of the
    index modulo 2^62, its top 31 bits, then the index."""
    mask = (1 << 62) - 1
    x = (index + 0x2545F4914F6CDD1D) & mask
    x = ((x ^ (x >> 30)) * 0x3F58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x14D049BB133111EB) & mask
    return ((x ^ (x >> 31)) >> 31, index)


def fair_argmax(column, rows=None):
    """The maximal entry of ``column``; on a tie, the tied row (global index ``rows[i]``) with the lowest tie key."""
    rows = np.arange(len(column)) if rows is None else np.asarray(rows)
    tied = np.flatnonzero(column == column.max())
    return int(rows[min(tied, key=lambda i: tie_key(int(rows[i])))])


def one_layer_model_source(loss_expression: str) -> str:
    """A user model module (`build`, `loss` factories) with one conv layer, whose per-image loss
    is `loss_expression` of `images`: the reference attack's simplest subject."""
    return f"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.stem(x)


def build(checkpoint):
    torch.manual_seed(0)
    return Net()


def loss(checkpoint):
    return lambda images: {loss_expression}
"""
