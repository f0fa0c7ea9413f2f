"""An audit says what it left out: loose images beside tar shards, clusters of a deselected embedding
layer, planted images it could not plant, members it could not read."""

import pytest

from conftest import make_images, tiny_spec, write_shards
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.errors import DataError
from pytest_memaudit.data.labelled import labelled_images
from pytest_memaudit.data.tarshards import open_image_folder

TINY = tiny_spec()
pytestmark = pytest.mark.usefixtures("one_thread")


def test_loose_images_beside_tar_shards_are_named(tmp_path):
    folder = write_shards(tmp_path / "shards", {"a.tar": ["k0", "k1", "k2"]})
    make_images(folder, 2, size=16)
    images = open_image_folder(folder, 16, None, seed=0)
    assert len(images) == 3
    assert images.warning == (f"2 image file(s) beside the .tar shards in {folder} (e.g. img_000.png) were left out: "
                              "a folder with .tar shards is read as shards only. Put them in a shard, or audit them "
                              "from a folder of their own")
    assert images.sample(2, seed=1).warning.startswith(images.warning)  # kept when sampling
    assert open_image_folder(write_shards(tmp_path / "only", {"a.tar": ["k0", "k1"]}), 16, None, 0).warning is None


def test_planted_control_with_fewer_held_out_images_than_asked_says_so(tmp_path):
    members = ImageSet.from_folder(make_images(tmp_path / "m", 4, size=16), 16, None, seed=0)
    held = ImageSet.from_folder(make_images(tmp_path / "h", 3, size=16, seed=1), 16, None, seed=0)
    images = labelled_images(members, held, planted=5)
    assert images.count(2) == 3  # PLANTED
    assert images.warning == ("the planted control plants 3 image(s), not the 5 asked (--memaudit-planted-units): "
                              "the held-out set has no more")
    assert labelled_images(members, held, planted=3).warning is None


def test_a_deselected_embedding_layer_leaves_a_note(tmp_path):
    settings = make_settings(model="tiny", data=str(make_images(tmp_path / "imgs", 6, size=16)), augmentations=0,
                             control="none", embedding_layer="conv3")
    result = run_audit(settings, TINY, ["conv1", "conv2"])
    assert result.memorized.clusters is None
    assert ("the memorized images were not clustered: the embedding layer conv3 (--memaudit-embedding-layer) is not "
            "audited in this run (deselected, e.g. by -k); select its test, or name an audited layer") in result.notes


def test_members_that_cannot_be_read_are_said_so(tmp_path):
    """With the held-out images readable, every layer used to stop saying it 'saw 0' data points."""
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(3):
        (data / f"bad{i}.png").write_bytes(b"not an image")
    settings = make_settings(model="tiny", data=str(data), augmentations=0, control="none",
                             holdout=str(make_images(tmp_path / "held", 3, size=16)))
    with pytest.raises(DataError, match=r"only 0 of the 3 member images in .*imgs could be read \(bad0.png: not an "
                                        r"image Pillow can read; .*\); UnitMem needs at least 2"):
        run_audit(settings, TINY)
