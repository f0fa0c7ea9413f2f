import numpy as np
import pytest
from PIL import Image

from var_checkpoints import write_var_checkpoint


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
