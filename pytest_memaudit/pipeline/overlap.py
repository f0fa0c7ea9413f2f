"""The held-out check: no held-out image may also be a member (compared by content digest, across processes)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data.labelled import LabelledImages
from ..errors import DataError
from ..metric.unitmem import HOLDOUT, MEMBER, PLANTED


def check_read(images: LabelledImages, read: np.ndarray, skipped: list[dict[str, str]], source: str) -> None:
    """The audit needs 2 readable members, and a readable image in a held-out set it was given."""
    if read.size == 0:
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"none of the {len(images)} images in {source} could be read ({first}). "
            "Check that the files are images (jpg, png, webp, bmp) and not truncated."
        )
    labels = images.labels[read]
    members = int(np.count_nonzero(labels == MEMBER))
    if members < 2:  # else every layer would stop later, saying only that it saw fewer than 2
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"only {members} of the {images.count(MEMBER)} member images in {source} could be read ({first}); "
            "UnitMem needs at least 2. Check that the files are images (jpg, png, webp, bmp) and not truncated."
        )
    if images.count(HOLDOUT, PLANTED) and not np.isin(labels, (HOLDOUT, PLANTED)).any():
        raise DataError(
            f"none of the {images.count(HOLDOUT, PLANTED)} held-out images ({images.holdout_description}) could "
            "be read. Check the --memaudit-holdout folder."
        )


class OverlapCheck:
    """Held-out images must not be members: compared by a digest of their decoded pixels. Within a
    process's stream as the batches arrive (its members come first), and across processes at the
    merge, where each process looks up every process's held-out digests among its own members."""

    def __init__(self, images: LabelledImages):
        self.images = images
        self.members: dict[bytes, int] = {}  # pixel digest -> position of the first member with it
        self.holdout: list[tuple[bytes, int]] = []  # (pixel digest, position) of the held-out images read

    def add(self, positions: list[int], pixels: torch.Tensor) -> None:
        found = []
        for position, image in zip(positions, pixels):
            digest = hashlib.sha256(image.numpy().tobytes()).digest()[:16]
            if self.images.labels[position] == MEMBER:
                self.members.setdefault(digest, position)
            else:
                self.holdout.append((digest, position))
                if digest in self.members:
                    found.append((position, self.members[digest]))
        self.raise_for(found)

    def overlaps(self, holdout: list[tuple[bytes, int]]) -> list[tuple[int, int]]:
        """(held-out position, member position) for the held-out digests among this process's members."""
        return [(position, self.members[digest]) for digest, position in holdout if digest in self.members]

    def raise_for(self, found: list[tuple[int, int]]) -> None:
        first: dict[int, int] = {}
        for held, member in found:
            first[held] = min(member, first.get(held, member))
        if not first:
            return
        ids = self.images.ids
        overlaps = [f"{ids[held]} = {ids[member]}" for held, member in first.items()]
        raise DataError(
            f"the held-out set shares images with the members (same decoded pixels): {', '.join(overlaps[:5])}"
            f"{' (the first found)' if len(overlaps) <= 5 else f' and {len(overlaps) - 5} more'}. Held-out "
            "images must be ones the model never trained on: remove them from --memaudit-holdout."
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"members": _digest_table(list(self.members.items())), "holdout": _digest_table(self.holdout)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.members = dict(_digest_pairs(state["members"]))
        self.holdout = _digest_pairs(state["holdout"])


def _digest_table(pairs: list[tuple[bytes, int]]) -> dict[str, torch.Tensor]:
    """(digest, position) pairs as tensors a snapshot can hold: (n, 16) uint8 and (n,) int64."""
    return {"digests": torch.tensor([list(digest) for digest, _ in pairs], dtype=torch.uint8).view(-1, 16),
            "positions": torch.tensor([position for _, position in pairs], dtype=torch.int64)}


def _digest_pairs(table: dict[str, torch.Tensor]) -> list[tuple[bytes, int]]:
    return [(bytes(digest), position) for digest, position in zip(table["digests"].tolist(), table["positions"].tolist())]
