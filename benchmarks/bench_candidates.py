"""Candidate encoder-only signals of memorization, members against held-out images, on a memorizer
and on the demo encoder (a null: it never trained on those members), from the full layer outputs.

    python benchmarks/bench_candidates.py                    # the shipped demo_memorizer, 64x64 (~2 min)
    python benchmarks/bench_candidates.py --fresh            # 3 memorizers of 16 fresh members, 32x32 (~5 min)
    python benchmarks/bench_candidates.py --fresh --mirror-target   # ... trained on reconstruction alone

Each image is passed as 7 views: plain, mirrored, plain + Gaussian noise (sd 0.05 in [-1, 1]), and
4 views of the seed recipe. Per layer and per image, the candidates (higher: more "member-like"):

- ``rms``, ``absmean``: root mean square and mean |a| over the whole output (units and positions),
  on the plain view (``_plain``) or averaged over the seed views (``_aug``);
- ``spvar``: the units' variance over positions over the mean square (spatial contrast); ``hf``:
  the squared differences of neighbouring positions over the mean square (high-frequency energy);
- features ``pool1`` / ``pool2`` / ``pool4`` (the signed output average-pooled to a 1x1 / 2x2 /
  4x4 grid, flattened), ``apool*`` (the same of |a|: ``apool1`` is what the audit's hooks keep),
  ``full`` (the whole map); on each: ``va_`` minus the spread of the seed views (the audit's view
  alignment), ``cosaug_`` the mean cosine between seed views, ``flipcos_`` the cosine between the
  plain view's and the mirrored view's features (the mirrored map flipped back first),
  ``noisecos_`` / ``noisedist_`` the cosine / minus the relative distance between the plain and
  the noisy view's, ``nnbr_`` the distance to the nearest other image (plain view, standardized).

Prints, per candidate, the layer whose AUC is furthest from 0.5 on the memorizer, with the null's
AUC at that layer, and both at ``conv.out``. AUCs only (no p-values): this is a search over about
50 candidates x 22 layers, so a single large AUC is a lead to validate on fresh member sets
(``--fresh``), not a finding.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from pytest_memaudit.data.augment import augment_views
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.models.hooks import find_module
from pytest_memaudit.metric.imagesignals import auc
from pytest_memaudit.models import var_layer_specs
from pytest_memaudit.models.demo import (DATA_SEED, DECODER_IMAGES, DECODER_START, HOLDOUT_START, MEMORIZER_HOLDOUT,
                                         MEMORIZER_WEIGHTS, build_demo, memorizer_holdout_set, memorizer_member_set)
from pytest_memaudit.models.train_demo import as_pixels, fit_decoder, memorize
from pytest_memaudit.pipeline.views import view_seed

LAYERS = var_layer_specs()
SEED_VIEWS = 4
FIRST_SEED_VIEW = 3  # views: plain, mirrored, noisy, then the seed views


def layer_statistics(model, pixels: torch.Tensor, ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, per statistic: (n, 7 views, ...) float64, computed inside forward hooks."""
    n = len(pixels)
    plain = pixels * 2 - 1
    noisy = plain + 0.05 * torch.randn(plain.shape, generator=torch.Generator().manual_seed(0))
    seed_views = augment_views(pixels, SEED_VIEWS, [view_seed(0, i) for i in ids]).view(n, SEED_VIEWS, *pixels.shape[1:])
    views = torch.cat([plain[:, None], plain.flip(-1)[:, None], noisy[:, None], seed_views], 1)
    k = views.shape[1]
    found: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs, output):
            a = output.detach().double().view(n, k, *output.shape[1:]).clone()
            a[:, 1] = a[:, 1].flip(-1)  # the mirrored view's map, flipped back
            energy = a.pow(2).mean((2, 3, 4))
            stats = {"rms": energy.sqrt(), "absmean": a.abs().mean((2, 3, 4)),
                     "spvar": a.var((3, 4), unbiased=False).mean(2) / energy,
                     "hf": ((a[..., 1:, :] - a[..., :-1, :]).pow(2).mean((2, 3, 4))
                            + (a[..., :, 1:] - a[..., :, :-1]).pow(2).mean((2, 3, 4))) / energy}
            for grid in (1, 2, 4):
                if a.shape[-1] >= grid:
                    stats[f"pool{grid}"] = F.adaptive_avg_pool2d(a.flatten(0, 1), grid).view(n, k, -1)
                    stats[f"apool{grid}"] = F.adaptive_avg_pool2d(a.abs().flatten(0, 1), grid).view(n, k, -1)
            if a[0, 0].numel() <= 4096:
                stats["full"] = a.flatten(2)
            found[name] = stats
        return record

    handles = [find_module(model, layer).register_forward_hook(hook(layer.name)) for layer in LAYERS]
    try:
        with torch.inference_mode():
            model(views.flatten(0, 1))
    finally:
        for handle in handles:
            handle.remove()
    return found


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def per_image(stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One number per image for every candidate but the nearest-neighbour ones (which need all images)."""
    seed = slice(FIRST_SEED_VIEW, FIRST_SEED_VIEW + SEED_VIEWS)
    values = {}
    for key in ("rms", "absmean", "spvar", "hf"):
        values[f"{key}_plain"] = stats[key][:, 0]
        values[f"{key}_aug"] = stats[key][:, seed].mean(1)
    for key in ("pool1", "apool1", "pool2", "apool2", "pool4", "apool4", "full"):
        x = stats.get(key)
        if x is None:
            continue
        views, mean = x[:, seed], x[:, seed].mean(1)
        values[f"va_{key}"] = -views.var(1, unbiased=False).sum(-1) / mean.pow(2).sum(-1)
        values[f"cosaug_{key}"] = torch.stack([cosine(views[:, i], views[:, j]) for i in range(SEED_VIEWS)
                                               for j in range(i + 1, SEED_VIEWS)], 1).mean(1)
        values[f"flipcos_{key}"] = cosine(x[:, 0], x[:, 1])
        values[f"noisecos_{key}"] = cosine(x[:, 0], x[:, 2])
        values[f"noisedist_{key}"] = -(x[:, 0] - x[:, 2]).norm(dim=-1) / x[:, 0].norm(dim=-1)
    return {key: value.numpy() for key, value in values.items()}


def nearest_distance(x: np.ndarray) -> np.ndarray:
    x = (x - x.mean(0)) / x.std(0).clip(1e-12)
    squared = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    return np.sqrt(squared.min(1))


def candidate_aucs(model, images: ImageSet, is_member: np.ndarray) -> dict[tuple[str, str], float]:
    """AUC (members against held-out) of every (candidate, layer)."""
    pixels = torch.stack([images.load(i) for i in range(len(images))]).float().div(255)
    parts: dict[tuple[str, str], list] = {}
    for start in range(0, len(images), 16):
        batch = layer_statistics(model, pixels[start:start + 16], images.ids[start:start + 16])
        for layer, stats in batch.items():
            for key, value in per_image(stats).items():
                parts.setdefault((key, layer), []).append(value)
            for key in ("apool1", "pool4", "full"):
                if key in stats:
                    parts.setdefault((f"nnbr_{key}", layer), []).append(stats[key][:, 0].numpy())
    aucs = {}
    for (key, layer), chunks in parts.items():
        values = np.concatenate(chunks)
        if key.startswith("nnbr_"):
            values = nearest_distance(values)
        aucs[(key, layer)] = auc(values[is_member], values[~is_member])
    return aucs


def print_table(memorizer: list[dict], null: list[dict]) -> None:
    """Per candidate, sorted by how far its best layer's mean AUC over member sets is from 0.5."""
    rows = []
    for key in sorted({k for k, _ in memorizer[0]}):
        layers = [layer.name for layer in LAYERS if (key, layer.name) in memorizer[0]]
        mean = {layer: np.mean([m[(key, layer)] for m in memorizer]) for layer in layers}
        best = max(layers, key=lambda layer: abs(mean[layer] - 0.5))
        rows.append((abs(mean[best] - 0.5), key, best))
    print(f"{'candidate':20s} {'layer':18s} {'memorizer AUC':>24s} {'null AUC':>20s}   conv.out: memorizer / null")
    for _, key, layer in sorted(rows, reverse=True):
        cells = []
        for where in (layer, "conv.out"):
            if (key, where) in memorizer[0]:
                cells.append(" ".join(f"{m[(key, where)]:.2f}" for m in memorizer) + " / "
                             + " ".join(f"{n[(key, where)]:.2f}" for n in null))
        print(f"{key:20s} {layer:18s} {cells[0]:>45s}   {cells[1] if len(cells) > 1 else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="memorizers of fresh member sets (train_demo.memorize)")
    parser.add_argument("--mirror-target", action="store_true", help="with --fresh: reconstruction alone")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=None, help="default 64, with --fresh 32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.image_size or (32 if args.fresh else 64)
    demo = build_demo(None).float()
    holdout = memorizer_holdout_set(size)
    memorizer_aucs, null_aucs = [], []
    if not args.fresh:
        members = memorizer_member_set(size)
        pool = ImageSet(members.ids + holdout.ids, None, size, DATA_SEED)
        is_member = np.arange(len(pool)) < len(members)
        memorizer_aucs.append(candidate_aucs(build_demo(MEMORIZER_WEIGHTS).float(), pool, is_member))
        null_aucs.append(candidate_aucs(demo, pool, is_member))
    else:
        decoder = fit_decoder(demo, as_pixels(ImageSet.builtin(DECODER_IMAGES, size, DATA_SEED, start=DECODER_START)),
                              100, seed=0)
        for seed in range(args.seeds):
            start = HOLDOUT_START + MEMORIZER_HOLDOUT + seed * args.members  # images nothing here trained on
            members = ImageSet.builtin(args.members, size, DATA_SEED, start=start)
            pool = ImageSet(members.ids + holdout.ids, None, size, DATA_SEED)
            is_member = np.arange(len(pool)) < len(members)
            encoder = copy.deepcopy(demo)
            memorize(encoder, decoder, as_pixels(members), args.steps, seed, mirror_target=args.mirror_target)
            memorizer_aucs.append(candidate_aucs(encoder, pool, is_member))
            null_aucs.append(candidate_aucs(demo, pool, is_member))
            print(f"member set {seed} done", flush=True)
    print_table(memorizer_aucs, null_aucs)


if __name__ == "__main__":
    main()
