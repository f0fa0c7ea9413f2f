"""Members, held-out and planted images as one labelled stream of data points.

An audit sees its members (the training images whose memorization it measures) and, when
given, held-out images of the same distribution that the model never trained on. Both flow
through the models in one pass as one sequence of data points: members first, then held-out
images. Each data point has a label (``unitmem.LABELS``: member, holdout, or planted, a held-out
image chosen for the planted control) and a group, a hash of its id that assigns it to one of
the error bars' groups whatever the batching or the number of processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..metric.unitmem import DEFAULT_GROUPS, HOLDOUT, LABELS, MEMBER, PLANTED
from .images import ImageSet

HOLDOUT_PREFIX = "holdout:"  # held-out files are named by this plus their path under the held-out folder


def group_of(image_id: str, groups: int) -> int:
    """The error-bar group of a data point: a hash of its id (its bytes kept as they are)."""
    digest = hashlib.blake2b(image_id.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % groups


@dataclass
class LabelledImages(ImageSet):
    """Data point i is ``ids[i]`` with ``labels[i]`` and ``groups[i]``; it loads from the set
    it came from. ``parts`` are (first position, image set) in stream order."""

    parts: list[tuple[int, ImageSet]] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    holdout_description: str | None = None

    def load(self, position: int) -> torch.Tensor:
        for start, part in reversed(self.parts):
            if position >= start:
                return part.load(position - start)
        raise IndexError(position)

    @property
    def notes(self) -> list[str]:
        """Warnings about the sets: fewer images than asked for, a held-out set too small."""
        notes = [part.warning for _, part in self.parts if part.warning]
        members, held = self.count(MEMBER), self.count(HOLDOUT, PLANTED)
        if held and held < 0.1 * members:
            notes.append(
                f"the held-out set ({held} images) is less than 10% of the members ({members}): the membership "
                "test has little power; audit at least as many held-out images as members if you can"
            )
        return notes

    def count(self, *labels: int) -> int:
        return int(np.count_nonzero(np.isin(self.labels, labels)))

    def positions(self, *labels: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels, labels))

    def label_names(self) -> list[str]:
        return [LABELS[code] for code in self.labels.tolist()]


def labelled_images(
    members: ImageSet,
    holdout: ImageSet | None = None,
    *,
    planted: int = 0,
    seed: int = 0,
    groups: int = DEFAULT_GROUPS,
) -> LabelledImages:
    """Members, then ``holdout``, with ``planted`` of the held-out images (seeded) labelled as
    planted. Held-out files keep their names behind ``HOLDOUT_PREFIX``; generated images
    (``builtin/N``) are named the same in either set."""
    held = [] if holdout is None else [
        image_id if holdout.root is None else HOLDOUT_PREFIX + image_id for image_id in holdout.ids
    ]
    ids = members.ids + held
    labels = np.array([MEMBER] * len(members) + [HOLDOUT] * len(held), dtype=np.int8)
    warning = members.warning
    if planted and held:
        chosen = np.random.default_rng([seed, 0x91A7]).choice(len(held), size=min(planted, len(held)), replace=False)
        labels[len(members) + np.sort(chosen)] = PLANTED
        if planted > len(held):
            warning = "; ".join(filter(None, [warning, f"the planted control plants {len(held)} image(s), not the "
                                              f"{planted} asked (--memaudit-planted-units): the held-out set has no "
                                              "more"]))
    parts = [(0, members)] + ([] if holdout is None else [(len(members), holdout)])
    unlisted = list(members.unlisted)
    if holdout is not None:
        prefix = "" if holdout.root is None else HOLDOUT_PREFIX
        unlisted += [{"id": prefix + item["id"], "reason": item["reason"]} for item in holdout.unlisted]
    return LabelledImages(
        ids=ids,
        root=members.root,
        size=members.size,
        seed=members.seed,
        warning=warning,
        description=members.description,
        canaries=members.canaries,
        unlisted=unlisted,
        parts=parts,
        labels=labels,
        groups=np.array([group_of(image_id, groups) for image_id in ids], dtype=np.int16),
        holdout_description=None if holdout is None else (holdout.description or str(holdout.root or "builtin")),
    )
