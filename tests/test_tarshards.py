"""A folder of .tar shards (WebDataset layout) as a data source, read in place."""

import re
import tarfile
import zlib

import pytest

from conftest import add_member, png_bytes, write_shards
from pytest_memaudit.data.images import decode_image
from pytest_memaudit.errors import DataError
from pytest_memaudit.data.tarshards import TarImageSet, open_image_folder, tar_members


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


def _header(name, size_field, kind=tarfile.REGTYPE):
    """A ustar header for ``name`` whose size field holds exactly ``size_field`` (12 bytes)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    block[124:136] = size_field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _octal(number):
    return b"%011o\0" % number


def _pax(records):
    return _header("PaxHeader", _octal(len(records)), tarfile.XHDTYPE) + records.ljust(-(-len(records) // 512) * 512, b"\0")


def _record(key, value):
    """A pax record ``length key=value\\n`` with its right length."""
    body = f" {key}={value}\n"
    length = len(body) + len(str(len(body)))
    return f"{length + (len(str(length)) > len(str(len(body))))}{body}".encode()


def _crafted_shard(folder, crafted):
    """A shard holding a good image, then the ``crafted`` bytes, then another good image."""
    folder.mkdir()
    image = png_bytes(1, size=8)  # one 512-byte block: the crafted bytes start at byte 1024
    member = _header("good.png", _octal(len(image))) + image.ljust(-(-len(image) // 512) * 512, b"\0")
    (folder / "a.tar").write_bytes(member + crafted + member.replace(b"good.png", b"late.png", 1) + b"\0" * 1024)
    return folder


@pytest.mark.parametrize("crafted, reason", [
    (_pax(b"0 path=x.png\n"), "the pax header at byte 1024 has a damaged record at its byte 0"),
    (_pax(b"3 size=5\n"), "the pax header at byte 1024 has a damaged record"),
    (_pax(b"99 size=5\n"), "the pax header at byte 1024 has a damaged record"),
    (_pax(_record("size", -1024)) + _header("x.png", _octal(0)), "gives the size '-1024', not a number of bytes"),
    (_header("big.png", b"\x80" + (64 << 30).to_bytes(11, "big")), "size of 68719476736 bytes, impossible in a file of"),
    (_pax(_record("size", 2**40)) + _header("x.png", _octal(0)), "size of 1099511627776 bytes, impossible"),
    (_header("x.png", b"\xff" * 12), "the header at byte 1024 gives a size of -1 bytes, impossible"),
    (_header("././@LongLink", _octal(1 << 20), tarfile.GNUTYPE_LONGNAME), "impossible in a file of"),
    (_header("x.png", b"12345678z\0\0\0"), "the header at byte 1024 has a size that is not a number"),
], ids=["pax-record-length-0", "pax-record-shorter-than-its-length", "pax-record-past-its-header", "pax-negative-size",
        "member-claims-64GiB", "pax-size-2^40", "base-256-all-0xff", "long-name-past-the-end", "size-not-octal"])
def test_crafted_headers_are_refused_naming_the_shard(tmp_path, crafted, reason):
    """Each of these hung the scan or ended in MemoryError/OverflowError (INTERNALERROR)."""
    folder = _crafted_shard(tmp_path / "shards", crafted)
    with pytest.raises(DataError, match=f"cannot read the tar shard .*a.tar: .*{re.escape(reason)}"):
        open_image_folder(folder, 16, None, seed=0)


def test_a_member_cut_short_is_skipped_with_its_reason(tmp_path):
    folder = _crafted_shard(tmp_path / "shards", b"")
    data = (folder / "a.tar").read_bytes()
    (folder / "a.tar").write_bytes(data[:1024 + 512 + 100])  # the second image keeps its first 100 bytes
    images = open_image_folder(folder, 16, None, seed=0)
    assert images.ids == ["a.tar/good.png", "a.tar/late.png"]
    assert images[0][1] is not None
    assert images[1][1] is None and images[1][2] == "its archive ends early (truncated)"
