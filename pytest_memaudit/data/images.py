"""The audited images: listing, sampling, decoding and batched loading.

An audit streams N images ("data points") through an encoder. Data point ``i`` is named by a
string id: a path relative to the data root with forward slashes (``cat/0001.jpg``), or
``builtin/0007`` for the generated set, which needs no files. Images reach the encoder as
uint8 tensors of shape (3, size, size); what the model does with them is not this module's
business.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import stat
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .builtin import BUILTIN_PREFIX, CANARY_PREFIX, builtin_ids, builtin_image, canary_image
from .characteristics import image_characteristics

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


# --- listing and sampling -------------------------------------------------------------------

def list_image_files(root: str | os.PathLike, unlisted: list[dict[str, str]] | None = None) -> list[str]:
    """Images under ``root`` (flat or one subfolder per class, any depth), as sorted POSIX
    paths relative to ``root``. Hidden files and folders are skipped; symlinked folders are
    followed once.

    Entries left out for a reason the user should see are appended to ``unlisted`` as
    ``{"id", "reason"}``: folders that cannot be read (id ending in ``/``), and image-named
    entries that are not regular files (named pipes, sockets, devices: opening one can block
    forever, so they are never opened) or cannot be reached (a broken link).
    """
    root = Path(root)
    try:
        os.stat(root)
    except FileNotFoundError:
        pass  # said below
    except OSError as exc:
        raise DataError(f"cannot read data directory {root}: {exc.strerror or exc}; check its permissions (and its "
                        "parent folders'), or pass --memaudit-data DIR with a readable folder.") from None
    if not root.exists():
        raise DataError(
            f"data directory {root} does not exist; pass --memaudit-data DIR with an existing "
            "folder of images (flat, or one subfolder per class)."
        )
    if not root.is_dir():
        raise DataError(
            f"data directory {root} is a file, not a directory; pass --memaudit-data DIR with "
            "the folder that holds the images (flat, or one subfolder per class)."
        )
    unlisted = [] if unlisted is None else unlisted
    images: list[str] = []
    others: Counter[str] = Counter()
    seen_dirs: set[str] = set()
    folders = [str(root)]
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a symlink loop, or a folder linked twice
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError as exc:
            if folder == str(root):
                raise DataError(f"cannot read data directory {root}: {exc.strerror or exc}; check its "
                                "permissions, or pass --memaudit-data DIR with a readable folder.") from None
            reason = f"cannot read the folder: {exc.strerror or exc}"
            unlisted.append({"id": folder_prefix(folder, root), "reason": reason})
            continue
        prefix = folder_prefix(folder, root)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links; the d_type of the listing, no extra call, for the rest
            except OSError as exc:  # a link to itself (ELOOP), an entry that cannot be looked at
                unlisted.append({"id": prefix + entry.name, "reason": f"cannot read it: {exc.strerror or exc}"})
                continue
            if is_dir:
                folders.append(entry.path)
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix not in IMAGE_EXTENSIONS:
                others[suffix or "(no extension)"] += 1
            elif entry.is_file():  # cannot raise now: is_dir looked at the same entry
                images.append(prefix + entry.name)
            else:
                unlisted.append({"id": prefix + entry.name, "reason": _not_a_file(entry)})
    unlisted.sort(key=lambda item: item["id"])
    if not images:
        accepted = " ".join(IMAGE_EXTENSIONS)
        if others:
            common = ", ".join(f"{suffix} x{count}" for suffix, count in others.most_common(5))
            seen = f"{sum(others.values())} other files were ignored ({common})"
        else:
            seen = "it holds no other files either"
        raise DataError(
            f"no images found under data directory {root}: accepted extensions are {accepted} "
            f"(any case) and {seen}; convert the images to one of these formats or pass "
            "--memaudit-data DIR with the folder that holds them."
        )
    return sorted(images)


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _not_a_file(entry: os.DirEntry) -> str:
    """Why an image-named entry that is not a regular file is left out (found without opening it)."""
    try:
        mode = entry.stat().st_mode
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind}); skipped without opening it"


def display_id(sample: str) -> str:
    """A data point's id as shown to people: bytes of a file name that are not UTF-8 (kept by Python
    as surrogate escapes) as ``\\xNN``, and control and format characters (terminal escapes, bidi
    overrides) as ``\\xNN`` or ``\\uNNNN``; everything else as it is."""
    if sample.isprintable():
        return sample
    shown = []
    for char in sample:
        if "\udc80" <= char <= "\udcff":  # one undecodable byte, as surrogateescape keeps it
            shown.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs"):
            shown.append(char.encode("unicode_escape").decode("ascii"))
        else:
            shown.append(char)
    return "".join(shown)


def folder_prefix(folder: str | os.PathLike, root: str | os.PathLike) -> str:
    """The POSIX path of ``folder`` relative to ``root`` with a trailing slash ('' for the root):
    what a file's name is prefixed with to make its id. Once per folder, not once per file
    (building a ``Path`` per file made listing a million files take several times longer)."""
    relative = Path(folder).relative_to(root).as_posix()
    return "" if relative == "." else relative + "/"


def select_samples(
    ids: list[str], samples: int | None, seed: int, *, source: str = "the data set"
) -> tuple[list[str], str | None]:
    """Pick ``samples`` of ``ids`` at random (seeded), or all of them when ``samples`` is None.

    Returns the chosen ids in sorted order and a warning when fewer ids than asked for exist
    (then all of them are used). The choice depends on the set of ids, not on their order.
    """
    if samples is not None and samples < 1:
        raise DataError(f"the number of samples must be at least 1, got {samples}; ask for 1 or more.")
    ids = sorted(ids)
    if samples is None or samples == len(ids):
        return ids, None
    if samples > len(ids):
        warning = (
            f"asked for {samples} samples but {source} holds only {len(ids)} images; "
            f"auditing all {len(ids)}"
        )
        return ids, warning
    chosen = np.random.default_rng(seed).choice(len(ids), size=samples, replace=False)
    return sorted(ids[i] for i in chosen), None


# --- decoding -------------------------------------------------------------------------------

class UnreadableImage(DataError):
    """One image file cannot be decoded; the loader reports it as skipped."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)  # plain args keep the exception picklable
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read image {self.path}: {self.reason}; replace or remove the file."


def decode_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Decode an image file to a uint8 (3, size, size) tensor.

    Any mode becomes RGB. Alpha (RGBA, LA, PA, palette or colour-key transparency) is dropped,
    keeping the stored colour of transparent pixels, as torchvision's ``ImageFolder`` loader
    (``convert("RGB")``) does. 16-bit greyscale is scaled to 8 bits (Pillow's own conversion
    would clip at 255). The image is then resized to (size, size), ignoring aspect ratio, with
    torchvision's bilinear antialiased resize.
    """
    try:
        with Image.open(path) as img:
            img.load()
            pixels = rgb_array(img)
    except UnidentifiedImageError as exc:
        empty = os.path.getsize(path) == 0
        raise UnreadableImage(path, "empty file" if empty else "not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(path, str(exc) or type(exc).__name__) from exc
    except Exception as exc:  # noqa: BLE001 (Pillow's decoders raise others on malformed files: skip the file)
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc
    return resize_image(to_chw(pixels), size)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``resize(image, [size, size], antialias=True)`` for uint8 on the CPU: the same
    interpolate call, without importing torchvision (seconds of start-up)."""
    if image.shape[1:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array to a contiguous (3, H, W) tensor. numpy does the transpose: torch's
    multi-threaded strided copy stalls for images this small on busy few-core hosts."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def rgb_array(img: Image.Image) -> np.ndarray:
    """A writable uint8 (H, W, 3) copy of ``img``."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit greyscale PNG
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        if "A" in img.mode or "transparency" in img.info:
            img = img.convert("RGBA")  # converting a palette image with transparency straight to RGB warns
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


# --- the audited set and its loader ---------------------------------------------------------

@dataclass
class ImageBatch:
    """Consecutive data points of one loader batch.

    ``images[k]`` is data point ``positions[k]``; ``skipped`` holds (position, reason) for the
    batch's images that failed to decode, so ``images`` may be empty, shape (0, 3, size, size).
    """

    positions: list[int]
    images: torch.Tensor
    skipped: list[tuple[int, str]]
    characteristics: dict[str, np.ndarray] | None = None  # per image, when the loader was asked for them
    views: torch.Tensor | None = None  # (images * V, 3, size, size) float, when the loader was asked to make them
    problem: str | None = None  # why the views of an image could not be made (the user's transform failed)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader's pinning thread when ``pin_memory`` is on."""
        return ImageBatch(self.positions, self.images.pin_memory(), self.skipped, self.characteristics,
                          None if self.views is None else self.views.pin_memory(), self.problem)


@dataclass
class ImageSet(Dataset):
    """The audited data points: ``ids[i]`` is data point i.

    ``root`` is the data directory, or None for generated images (``builtin/N`` and
    ``canary/K`` ids). ``warning`` carries the sampling warning (fewer images than asked for),
    if any. As a ``Dataset``, item i is ``(i, image, None)`` or ``(i, None, reason)`` when the
    image cannot be decoded.
    """

    ids: list[str]
    root: Path | None
    size: int
    seed: int
    warning: str | None = None
    description: str | None = None  # how reports name the source; default: the root or "builtin"
    canaries: list[str] = field(default_factory=list)  # ids of images planted to be memorized
    # entries of the folder left out at listing time, {"id", "reason"} (see list_image_files)
    unlisted: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, size: int, samples: int | None, seed: int
    ) -> ImageSet:
        root = Path(root)
        unlisted: list[dict[str, str]] = []
        ids, warning = select_samples(list_image_files(root, unlisted), samples, seed, source=str(root))
        return cls(ids, root, size, seed, warning, unlisted=unlisted)

    @classmethod
    def builtin(cls, n: int, size: int, seed: int, start: int = 0) -> ImageSet:
        """Generated images ``start`` to ``start + n - 1`` (a held-out set starts past the members)."""
        if n < 1:
            raise DataError(f"the built-in image set needs at least 1 sample, got {n}; ask for 1 or more.")
        return cls(builtin_ids(n, start), None, size, seed)

    def sample(self, samples: int, seed: int) -> ImageSet:
        """``samples`` of these data points, chosen as ``from_folder`` chooses files."""
        source = f"the {self.description}" if self.description else "the data set"
        ids, warning = select_samples(self.ids, samples, seed, source=source)
        chosen = set(ids)
        return replace(
            self,
            ids=ids,
            warning=warning,
            description=self.description if len(ids) == len(self.ids) else f"{len(ids)} chosen from {source}",
            canaries=[canary for canary in self.canaries if canary in chosen],
        )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, position: int) -> torch.Tensor:
        """Data point ``position`` as uint8 (3, size, size); raises ``UnreadableImage``."""
        id_ = self.ids[position]
        if self.root is None:
            if id_.startswith(CANARY_PREFIX):
                return to_chw(canary_image(int(id_.removeprefix(CANARY_PREFIX)), self.size, self.seed))
            index = int(id_.removeprefix(BUILTIN_PREFIX))
            return to_chw(builtin_image(index, self.size, self.seed))
        return decode_image(self.root / id_, self.size)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return position, self.load(position), None
        except UnreadableImage as exc:
            return position, None, exc.reason

    def iter_batches(
        self, images_per_batch: int, workers: int, *, pin_memory: bool = False, positions: Sequence[int] | None = None,
        characteristics: bool = False, views: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    ) -> Iterator[ImageBatch]:
        """Batches of consecutive data points (of ``positions``, default all) in order; ``workers``
        = 0 decodes in process. ``characteristics``: also measure each decoded image
        (``characteristics.py``), in the worker that decoded it. ``views(image, id)``: also make each
        decoded image's views there (a transform that works one image at a time)."""
        scratch = worker_scratch() if workers > 0 else None
        batches = iter(DataLoader(
            self if views is None else _WithViews(self, views),
            batch_size=images_per_batch,
            sampler=positions,
            shuffle=False,
            num_workers=workers,
            collate_fn=functools.partial(_collate, size=self.size, characteristics=characteristics),
            pin_memory=pin_memory,
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=functools.partial(_start_worker, scratch) if workers > 0 else None,
        ))
        try:
            if not scratch:
                yield from batches
                return
            while True:
                with temporary_folder(scratch):
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch
        finally:  # also when the consumer stops early (an error, SIGTERM) and closes this generator
            if scratch:
                # Stop the workers now: an interrupt's traceback may hold the iterator, and then its
                # __del__ (which does this) would come too late, after their folder is gone.
                batches._shutdown_workers()
                shutil.rmtree(scratch, ignore_errors=True)


# What a worker's multiprocessing adds to the folder's path for the socket it passes tensors by:
# "/pymp-XXXXXXXX/listener-XXXXXXXX"; the whole must fit AF_UNIX's 108 bytes.
SOCKET_PATH_TAIL = 32
SOCKET_PATH_MAX = 107


def worker_scratch() -> str:
    """A new folder for the decoding workers' temporary files: in the temporary folder, or in /tmp
    when that one's path is too long for their sockets (as Python 3.12's multiprocessing does)."""
    base = tempfile.gettempdir()
    if len(os.path.join(base, "memaudit-XXXXXXXX")) + SOCKET_PATH_TAIL > SOCKET_PATH_MAX and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="memaudit-", dir=base)


@contextlib.contextmanager
def temporary_folder(folder: str) -> Iterator[None]:
    """Python's temporary folder is ``folder`` while the block runs. While it waits for a batch, torch's
    DataLoader checks, when reading from its workers fails, the open-files limit by making 10 named
    temporary files; a worker's death signalled in the middle of one leaves it on disk. Made in the
    workers' folder, it goes with that folder. (The setting is the process's: another thread making a
    temporary file meanwhile makes it there too, and it is removed with the folder if left.)"""
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _start_worker(scratch: str, worker: int) -> None:
    """Set up a decoding worker. It leaves the audit's process group: CI runners, Slurm and torchrun
    send SIGTERM to the whole group, and a worker killed by it ended the run in torch's 'worker
    killed' error; the audit's process alone gets it, unwinds (``signals.py``) and stops its workers
    itself (a worker whose audit process is gone exits on its own: torch watches the parent). Its
    temporary files (multiprocessing's ``pymp-*`` folder, for passing tensors) go in ``scratch``,
    which the audit's process removes even when a worker had to be killed before it cleaned up."""
    if hasattr(os, "setpgid"):  # POSIX
        os.setpgid(0, 0)
    tempfile.tempdir = scratch
    drop_inherited_connections()  # so that the audit's process, killed, is seen gone at once


def drop_inherited_connections() -> None:
    """In a process forked from one of a launch (a decoding worker): close this process's copies of
    the TCP connections it inherited (the process group's, the store's). A copy keeps a connection
    open after the process that made it dies, so the other processes would not see it gone until its
    workers exit too. A worker talks to its process over pipes and local sockets only. Linux (/proc)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and os.path.isdir("/proc/self/fd")):
        return
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            connection = socket.socket(fileno=fd)  # finds the socket's family
            family = connection.family
            connection.detach()  # without closing it
            if family in (socket.AF_INET, socket.AF_INET6):
                os.close(fd)
        except (OSError, ValueError):
            continue


_WORKER_LOST = re.compile(r"DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\)\)? (is killed by signal: ([^.]+)|exited "
                          r"unexpectedly)", re.S)


def lost_worker(exc: BaseException) -> str | None:
    """What became of a decoding worker, if ``exc`` (or the error it was raised from) is torch's
    report of a worker that died (killed by a signal, e.g. the out-of-memory killer); else None. torch
    may report one death twice ("exited unexpectedly", raised from "is killed by signal: ..."): the
    report that names the signal wins."""
    reports = []
    while exc is not None:
        found = _WORKER_LOST.search(str(exc)) if isinstance(exc, RuntimeError) else None
        if found:
            reports.append(found)
        exc = exc.__cause__
    if not reports:
        return None
    found = next((report for report in reports if report.group(3)), reports[0])
    pids = found.group(1).strip(", ")
    fate = f"was killed by signal {found.group(3).strip()}" if found.group(3) else "exited unexpectedly"
    return f"the image-decoding worker process {pids} (a DataLoader worker of --memaudit-workers) {fate}"


class _WithViews(Dataset):
    """An image set whose items also carry the image's views: ``(i, image, None, views)``, or instead of
    the views why they could not be made (a DataError's message, passed on rather than raised in a worker)."""

    def __init__(self, images: ImageSet, views: Callable[[torch.Tensor, str], torch.Tensor]):
        self.images, self.views = images, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int):
        position, image, reason = self.images[position]
        try:
            return position, image, reason, None if image is None else self.views(image, self.images.ids[position])
        except DataError as exc:
            return position, image, reason, str(exc)


def _collate(items: list[tuple], size: int, characteristics: bool = False) -> ImageBatch:
    loaded = [(item[0], item[1]) for item in items if item[1] is not None]
    skipped = [(item[0], item[2]) for item in items if item[1] is None]
    views = [item[3] for item in items if item[1] is not None] if items and len(items[0]) == 4 else None
    problem = next((made for made in views or [] if isinstance(made, str)), None)
    if loaded:
        # numpy's single-threaded stack: torch.stack's thread pool stalls on busy few-core hosts
        images = torch.from_numpy(np.stack([image.numpy() for _, image in loaded]))
    else:
        images = torch.empty((0, 3, size, size), dtype=torch.uint8)
    measured = image_characteristics(images) if characteristics else None
    if views is not None:
        views = None if problem else torch.cat(views) if views else torch.empty((0, 3, size, size))
    return ImageBatch([position for position, _ in loaded], images, skipped, measured, views, problem)
