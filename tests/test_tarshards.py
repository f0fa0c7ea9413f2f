"""A folder of .tar shards (WebDataset layout) as a data source, read in place."""

import tarfile
import zlib

import pytest

from conftest import add_member, png_bytes, write_shards
from pytest_memaudit.data import decode_image
from pytest_memaudit.errors import DataError
from pytest_memaudit.tarshards import TarImageSet, open_image_folder, tar_members


def test_members_are_data_points_named_by_archive_and_path(tmp_path):
    folder = write_shards(tmp_path / "shards", {"train-000001.tar": ["b/x2", "a/x1"], "train-000000.tar": ["z"]},
                          broken={"b/x2"})
    (tmp_path / "shards" / "notes.txt").write_text("ignored")
    images = open_image_folder(folder, 16, None, seed=0)
    assert isinstance(images, TarImageSet)
    assert images.ids == ["train-000000.tar/z.png", "train-000001.tar/a/x1.png", "train-000001.tar/b/x2.png"]
    # the same pixels as the file decoded from disk
    (tmp_path / "x1.png").write_bytes(png_bytes(zlib.crc32(b"a/x1")))
    assert images.load(1).equal(decode_image(tmp_path / "x1.png", 16))
    assert images[2][1] is None and "not an image" in images[2][2]  # skipped, with its reason
    batches = list(images.iter_batches(2, workers=1))
    assert [b.positions for b in batches] == [[0, 1], []] and batches[1].skipped[0][0] == 2


def test_sampling_keeps_members_and_offsets_together(tmp_path):
    keys = [f"k{i:02d}" for i in range(12)]
    folder = write_shards(tmp_path / "shards", {"a.tar": keys[:7], "b.tar": keys[7:]})
    everything = open_image_folder(folder, 16, None, seed=0)
    some = open_image_folder(folder, 16, 5, seed=3)
    assert len(some) == 5 and set(some.ids) <= set(everything.ids)
    for position, image_id in enumerate(some.ids):
        assert some.load(position).equal(everything.load(everything.ids.index(image_id)))
    again = everything.sample(4, seed=1)
    assert again.load(0).equal(everything.load(everything.ids.index(again.ids[0])))


def test_bad_shards_are_data_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match="cannot read the tar shard .*x.tar: no tar header at byte 0"):
        open_image_folder(tmp_path / "bad", 16, None, seed=0)
    folder = write_shards(tmp_path / "labels", {"a.tar": []})
    with tarfile.open(folder / "a.tar", "w") as archive:
        add_member(archive, "k.cls", b"1")
    with pytest.raises(DataError, match="hold no images"):
        open_image_folder(folder, 16, None, seed=0)


@pytest.mark.parametrize("form", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_headers_are_read_as_tarfile_reads_them(tmp_path, form):
    names = ["a.jpg", "dir/b.png", "p/" + "y" * 90 + "/q" * 20 + ".jpg", "café/ü.jpg"]
    if form != tarfile.USTAR_FORMAT:
        names.append("x" * 120 + "/long.png")  # past ustar's 255 bytes: a GNU long name or a pax path
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=form) as archive:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for i, name in enumerate(names):
            add_member(archive, name, bytes(range(i * 37 % 200)))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        archive.addfile(link)
    with tarfile.open(path) as archive:
        expected = [(member.name, member.offset_data, member.size) for member in archive if member.isfile()]
    assert tar_members(path) == expected and len(expected) == len(names)
