"""Tests for pytest_memaudit.data.images: listing, sampling, decoding, the built-in set, batching."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import make_images
from pytest_memaudit.data.images import (ImageSet, UnreadableImage, decode_image, display_id, list_image_files,
                                         select_samples)
from pytest_memaudit.data.builtin import builtin_ids, builtin_image
from pytest_memaudit.errors import DataError
from pytest_memaudit.data.tarshards import open_image_folder

S = 16  # decoded size used by most tests


def touch(path: Path, content: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def solid(path: Path, color, mode: str = "RGB", size=(40, 30), **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def assert_color(image: torch.Tensor, rgb, tolerance: int = 0) -> None:
    assert image.dtype == torch.uint8
    assert image.shape == (3, S, S)
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1)
    assert (image.to(torch.int16) - expected).abs().max().item() <= tolerance


# --- listing --------------------------------------------------------------------------------


def test_list_flat_folder_filters_and_sorts(tmp_path):
    for name in ["b.png", "A.JPG", "c.Jpeg", "d.webp", "e.BMP", "notes.txt", "f.gif", ".hidden.png"]:
        touch(tmp_path / name)
    touch(tmp_path / ".cache" / "x.png")
    assert list_image_files(tmp_path) == ["A.JPG", "b.png", "c.Jpeg", "d.webp", "e.BMP"]


def test_list_class_subfolders_recursive(tmp_path):
    for name in ["dogs/2.jpg", "cats/1.png", "cats/10.png", "dogs/puppies/3.webp", "top.png", "cats/.DS_Store"]:
        touch(tmp_path / name)
    assert list_image_files(tmp_path) == [
        "cats/1.png",
        "cats/10.png",
        "dogs/2.jpg",
        "dogs/puppies/3.webp",
        "top.png",
    ]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_list_follows_symlinked_folders_without_looping(tmp_path):
    touch(tmp_path / "real" / "a.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")
    assert list_image_files(data) == ["linked/a.png"]


def test_list_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        list_image_files(missing)
    assert str(missing) in str(info.value)
    assert "--memaudit-data" in str(info.value)


def test_list_file_instead_of_directory(tmp_path):
    file = tmp_path / "img.png"
    touch(file)
    with pytest.raises(DataError, match="not a directory") as info:
        list_image_files(file)
    assert str(file) in str(info.value)


def test_list_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no images found") as info:
        list_image_files(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert ".png" in str(info.value)


def test_list_directory_without_images_counts_other_files(tmp_path):
    for name in ["a.tif", "b.tif", "readme"]:
        touch(tmp_path / name)
    with pytest.raises(DataError, match="3 other files") as info:
        list_image_files(tmp_path)
    assert ".tif x2" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_list_skips_special_files_without_opening_them(tmp_path):
    import socket

    touch(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.png")  # opening it would block until a writer comes
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s.jpg"))
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    unlisted = []
    assert list_image_files(tmp_path, unlisted) == ["a.png"]
    server.close()
    assert unlisted == [
        {"id": "gone.png", "reason": "cannot read it: No such file or directory"},
        {"id": "s.jpg", "reason": "not a regular file (a socket); skipped without opening it"},
        {"id": "x.png", "reason": "not a regular file (a named pipe); skipped without opening it"},
    ]
    assert ImageSet.from_folder(tmp_path, S, None, 0).unlisted == unlisted


def refuse_to_read(monkeypatch, folder):
    """As a folder without read permission does (root reads every folder, so chmod cannot show it)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_list_reports_unreadable_folders(tmp_path, monkeypatch):
    touch(tmp_path / "a.png")
    touch(tmp_path / "locked" / "inner" / "b.png")
    refuse_to_read(monkeypatch, tmp_path / "locked")
    unlisted = []
    assert list_image_files(tmp_path, unlisted) == ["a.png"]
    assert unlisted == [{"id": "locked/", "reason": "cannot read the folder: Permission denied"}]


def test_list_unreadable_root_is_an_error(tmp_path, monkeypatch):
    touch(tmp_path / "a.png")
    refuse_to_read(monkeypatch, tmp_path)
    with pytest.raises(DataError, match=f"cannot read data directory {tmp_path}: Permission denied"):
        list_image_files(tmp_path)


def non_utf8_file(folder: Path, raw_name: bytes, content: bytes) -> str:
    """Write a file whose name is not UTF-8; return the name as Python sees it (surrogate escapes)."""
    with open(os.path.join(os.fsencode(folder), raw_name), "wb") as handle:
        handle.write(content)
    return os.fsdecode(raw_name)


def test_non_utf8_names_are_listed_loaded_and_displayed_escaped(tmp_path):
    png = solid(tmp_path / "plain.png", (10, 200, 30)).read_bytes()
    name = non_utf8_file(tmp_path, b"caf\xe9 \xff.png", png)
    assert name == "caf\udce9 \udcff.png"
    images = ImageSet.from_folder(tmp_path, S, None, 0)
    assert images.ids == [name, "plain.png"]
    assert_color(images.load(0), (10, 200, 30))
    assert display_id(name) == "caf\\xe9 \\xff.png"
    assert display_id("été/ok.png") == "été/ok.png"  # valid UTF-8 stays as it is
    assert display_id("a\x1b[31mb\u202ec\t.png") == "a\\x1b[31mb\\u202ec\\t.png"  # no terminal or bidi control


# --- sampling -------------------------------------------------------------------------------

IDS = [f"img{i:03d}.png" for i in range(100)]


def test_select_subset_is_sorted_seeded_and_distinct():
    chosen, warning = select_samples(IDS[::-1], 10, seed=0)
    assert warning is None
    assert len(chosen) == len(set(chosen)) == 10
    assert set(chosen) <= set(IDS)
    assert chosen == sorted(chosen)
    assert select_samples(IDS, 10, seed=0)[0] == chosen
    assert select_samples(IDS, 10, seed=1)[0] != chosen


def test_select_all():
    assert select_samples(IDS[::-1], None, seed=0) == (IDS, None)
    assert select_samples(IDS, 100, seed=0) == (IDS, None)


def test_select_more_than_available_warns():
    chosen, warning = select_samples(IDS[:37], 500, seed=0, source="/data/x")
    assert chosen == IDS[:37]
    assert warning == "asked for 500 samples but /data/x holds only 37 images; auditing all 37"


def test_select_rejects_zero_samples():
    with pytest.raises(DataError, match="at least 1"):
        select_samples(IDS, 0, seed=0)


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mode, color, expected, tolerance, save_args",
    [
        ("rgb.png", "RGB", (10, 200, 30), (10, 200, 30), 0, {}),
        ("rgb.bmp", "RGB", (10, 200, 30), (10, 200, 30), 0, {}),
        ("rgb.webp", "RGB", (10, 200, 30), (10, 200, 30), 0, {"lossless": True}),
        ("rgb.jpg", "RGB", (10, 200, 30), (10, 200, 30), 4, {"quality": 95}),
        ("grey.png", "L", 77, (77, 77, 77), 0, {}),
        ("bilevel.png", "1", 1, (255, 255, 255), 0, {}),
        ("rgba.png", "RGBA", (10, 200, 30, 0), (10, 200, 30), 0, {}),  # alpha dropped
        ("la.png", "LA", (90, 0), (90, 90, 90), 0, {}),
        ("cmyk.jpg", "CMYK", (0, 255, 255, 0), (255, 0, 0), 4, {"quality": 95}),
    ],
)
def test_decode_modes_to_rgb(tmp_path, name, mode, color, expected, tolerance, save_args):
    path = solid(tmp_path / name, color, mode, **save_args)
    assert_color(decode_image(path, S), expected, tolerance)


def test_decode_any_decoder_failure_is_an_unreadable_image(tmp_path, monkeypatch):
    path = solid(tmp_path / "odd.png", (1, 2, 3))

    def malformed(self):
        raise IndexError("tile cannot extend outside image")

    monkeypatch.setattr(Image.Image, "load", malformed)
    with pytest.raises(UnreadableImage) as info:
        decode_image(path, S)
    assert info.value.reason == "IndexError: tile cannot extend outside image"


def palette_image() -> Image.Image:
    image = Image.new("P", (40, 30), 3)
    image.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] * 64)
    return image


def test_decode_palette(tmp_path):
    palette_image().save(tmp_path / "p.png")
    assert_color(decode_image(tmp_path / "p.png", S), (200, 100, 50))


def test_decode_palette_with_transparency_keeps_colour_without_warning(tmp_path):
    palette_image().save(tmp_path / "p.png", transparency=bytes([0, 128, 255, 0]))
    with Image.open(tmp_path / "p.png") as stored:
        assert stored.info["transparency"] == bytes([0, 128, 255, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_image(tmp_path / "p.png", S)
    assert_color(image, (200, 100, 50))


def test_decode_16bit_greyscale_scales_to_8_bits(tmp_path):
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as stored:
        assert stored.mode.startswith("I")
    assert_color(decode_image(tmp_path / "g16.png", S), (156, 156, 156))  # round(40000 / 257)


@pytest.mark.parametrize("size", [24, 80])
def test_decode_matches_torchvision_resize(tmp_path, size):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    expected = TF.resize(torch.from_numpy(pixels).permute(2, 0, 1), [size, size], antialias=True)
    decoded = decode_image(tmp_path / "noise.png", size)
    assert decoded.shape == (3, size, size)
    assert torch.equal(decoded, expected)


def test_decode_keeps_size_when_already_square(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "same.png")
    assert torch.equal(decode_image(tmp_path / "same.png", S), torch.from_numpy(pixels).permute(2, 0, 1))


def test_decode_truncated_jpeg(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    touch(tmp_path / "cut.jpg", data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="truncated") as info:
        decode_image(tmp_path / "cut.jpg", S)
    assert info.value.path == tmp_path / "cut.jpg"


def test_decode_zero_byte_file(tmp_path):
    touch(tmp_path / "empty.jpg")
    with pytest.raises(UnreadableImage) as info:
        decode_image(tmp_path / "empty.jpg", S)
    assert info.value.reason == "empty file"
    assert isinstance(info.value, DataError)
    assert str(tmp_path / "empty.jpg") in str(info.value)


def test_decode_text_named_png(tmp_path):
    touch(tmp_path / "fake.png", b"this is not an image\n")
    with pytest.raises(UnreadableImage) as info:
        decode_image(tmp_path / "fake.png", S)
    assert info.value.reason == "not an image Pillow can read"
    copy = pickle.loads(pickle.dumps(info.value))  # crosses DataLoader worker processes intact
    assert (copy.path, copy.reason) == (info.value.path, info.value.reason)


# --- built-in set ---------------------------------------------------------------------------


def test_builtin_image_shape_and_determinism():
    for size in (33, 64):
        image = builtin_image(5, size, seed=0)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert np.array_equal(builtin_image(7, 64, seed=3), builtin_image(7, 64, seed=3))
    assert not np.array_equal(builtin_image(7, 64, seed=3), builtin_image(7, 64, seed=4))


def test_builtin_images_are_distinct():
    images = np.stack([builtin_image(i, 64, seed=0) for i in range(64)]).reshape(64, -1).astype(np.float32)
    differences = np.abs(images[:, None] - images[None]).mean(axis=-1)
    np.fill_diagonal(differences, np.inf)
    assert differences.min() > 10  # mean absolute difference, on the 0..255 scale
    assert all(image.std() > 5 for image in images.reshape(64, 64, 64, 3))  # none flat


def test_builtin_ids():
    assert builtin_ids(3) == ["builtin/0000", "builtin/0001", "builtin/0002"]
    many = builtin_ids(10001)
    assert many[-1] == "builtin/10000" and many == sorted(many)


# --- ImageSet and batches -------------------------------------------------------------------

BROKEN = {3: b"not an image", 6: b"", 7: b"\x89PNG\r\n\x1a\n"}


def make_folder(root: Path, count: int = 10) -> Path:
    """``img0i.png`` is solid grey 20*i, except positions in BROKEN, which cannot be decoded."""
    for i in range(count):
        path = root / f"img{i:02d}.png"
        if i in BROKEN:
            touch(path, BROKEN[i])
        else:
            solid(path, (20 * i,) * 3)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches_preserves_order_and_reports_skips(tmp_path, workers):
    images = ImageSet.from_folder(make_folder(tmp_path), S, samples=None, seed=0)
    assert len(images) == 10 and images.warning is None
    batches = list(images.iter_batches(images_per_batch=2, workers=workers))
    assert [b.positions for b in batches] == [[0, 1], [2], [4, 5], [], [8, 9]]
    assert [[p for p, _ in b.skipped] for b in batches] == [[], [3], [], [6, 7], []]
    assert all(reason for b in batches for _, reason in b.skipped)
    for batch in batches:
        assert batch.images.dtype == torch.uint8
        assert batch.images.shape == (len(batch.positions), 3, S, S)
        for position, image in zip(batch.positions, batch.images):
            assert torch.all(image == 20 * position)


def test_from_folder_samples_and_warning(tmp_path):
    root = make_folder(tmp_path)
    subset = ImageSet.from_folder(root, S, samples=4, seed=0)
    assert len(subset) == 4 and subset.ids == sorted(subset.ids) and subset.root == root
    assert subset.warning is None
    everything = ImageSet.from_folder(root, S, samples=50, seed=0)
    assert len(everything) == 10
    assert everything.warning == f"asked for 50 samples but {root} holds only 10 images; auditing all 10"


def test_sample_of_a_named_set_keeps_its_chosen_canaries_and_says_so():
    canaries = ["canary/0", "canary/1"]
    images = ImageSet(builtin_ids(20) + canaries, None, 16, seed=0, description="demo set", canaries=canaries)
    part = images.sample(5, seed=3)
    assert part.ids == select_samples(images.ids, 5, seed=3)[0]
    assert part.canaries == [c for c in canaries if c in part.ids]
    assert part.description == "5 chosen from the demo set"
    assert (part.warning, part.size, part.seed, part.root) == (None, 16, 0, None)
    assert images.sample(4, seed=3).ids != images.sample(4, seed=4).ids
    everything = images.sample(30, seed=3)
    assert len(everything) == 22 and everything.canaries == canaries and everything.description == "demo set"
    assert everything.warning == "asked for 30 samples but the demo set holds only 22 images; auditing all 22"


def test_builtin_set_batches():
    images = ImageSet.builtin(5, 32, seed=2)
    assert images.root is None and images.ids == builtin_ids(5)
    batches = list(images.iter_batches(images_per_batch=3, workers=0))
    assert [b.positions for b in batches] == [[0, 1, 2], [3, 4]]
    stacked = torch.cat([b.images for b in batches])
    expected = torch.from_numpy(np.stack([builtin_image(i, 32, seed=2) for i in range(5)])).permute(0, 3, 1, 2)
    assert torch.equal(stacked, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_iter_batches_pins_memory():
    batch = next(ImageSet.builtin(2, 8, seed=0).iter_batches(2, workers=0, pin_memory=True))
    assert batch.images.is_pinned()


def test_a_link_to_itself_is_skipped_with_its_reason(tmp_path):
    """ELOOP crashed the listing (INTERNALERROR)."""
    folder = make_images(tmp_path / "imgs", 2, size=16)
    os.symlink("self.jpg", folder / "self.jpg")
    os.symlink("loop", folder / "loop")
    unlisted = []
    assert list_image_files(folder, unlisted) == ["img_000.png", "img_001.png"]
    reason = f"cannot read it: {os.strerror(40)}"  # ELOOP
    assert unlisted == [{"id": "loop", "reason": reason}, {"id": "self.jpg", "reason": reason}]
    assert open_image_folder(folder, 16, None, seed=0).unlisted == unlisted


@pytest.mark.parametrize("fails", ["stat", "scandir"])
def test_an_unreadable_data_root_is_a_data_error(tmp_path, monkeypatch, fails):
    """A root that cannot be looked at (a parent without x permission: stat fails) or read (scandir fails)
    crashed the listing. Simulated: this test may run as root, whom permissions do not stop."""
    folder = make_images(tmp_path / "imgs", 2, size=16)
    real = getattr(os, fails)

    def refused(path, *args, **kwargs):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, fails, refused)
    with pytest.raises(DataError, match=f"cannot read data directory {folder}: Permission denied; check its "
                                        "permissions"):
        open_image_folder(folder, 16, None, seed=0)
