"""Calibration and power of the per-image signals (``imagesignals.py``) and of the loss attack.

    python benchmarks/bench_power.py            # about 30 minutes on one busy CPU core
    python benchmarks/bench_power.py --quick    # a small run, to check the script runs

Null: the demo encoder on generated images that neither it nor the memorizer's decoder ever
trained on (the ``demo_memorizer``'s held-out set), split ``--null-splits`` times at random into
``--members`` "members" and the rest. Every signal's per-image values do not depend on the labels
(the neighbour distance and the argmax pool all images), so they are measured once and only the
labels are redrawn. False-positive rate: the share of splits with p < 0.05, per (signal, layer)
(averaged over layers), and per signal after Holm's correction across layers (family-wise).

Power: a decoder fitted to the frozen demo encoder (``train_demo.fit_decoder``), then for each of
``--seeds`` member sets (fresh generated images) the encoder alone trained on the members
(``train_demo.memorize``), kept after each of ``--steps`` steps (0: the demo itself). Detected: the
signal's smallest Holm-adjusted p across layers below 0.05 (the loss: its p below 0.05). Members
against the memorizer's held-out set, at 32x32 (``--image-size``; the shipped memorizer is 64x64,
where each step costs 2.6 times as much) with ``--views`` views per image.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from pytest_memaudit.pipeline.forward import model_input
from pytest_memaudit.pipeline.views import resolve_recipe, view_seed
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.models.hooks import LayerRecorder
from pytest_memaudit.metric.imagesignals import LOSS_LAYER, contrast_signals, signal_columns, view_scalars
from pytest_memaudit.models import VAR_INPUT, var_layer_specs
from pytest_memaudit.models.demo import (DATA_SEED, DECODER_IMAGES, DECODER_START, HOLDOUT_START,
                                         MEMORIZER_HOLDOUT, build_demo, memorizer_holdout_set)
from pytest_memaudit.metric.stats import holm
from pytest_memaudit.models.train_demo import as_pixels, fit_decoder, memorize, reconstruction_errors

LAYERS = var_layer_specs()
FRESH_START = HOLDOUT_START + MEMORIZER_HOLDOUT  # generated images nothing here trained on


def columns_of(encoder, decoder, images: ImageSet, views: int, recipe_name: str = "seed", seed: int = 0) -> dict:
    """Every (signal, layer) column of per-image values over ``images``, as the audit computes them
    (the argmax counts over these images pooled), with minus the decoder's loss."""
    per_view: dict[str, list] = {}
    recipe = resolve_recipe(recipe_name, views, images.size)
    per_image = recipe.views_per_image(views)
    with torch.inference_mode(), LayerRecorder(encoder, LAYERS) as recorder:
        for start in range(0, len(images), 16):
            positions = range(start, min(start + 16, len(images)))
            pixels = torch.stack([images.load(i) for i in positions]).float().div(255)
            batch = model_input(recipe.make(pixels, views, [view_seed(seed, images.ids[i]) for i in positions]),
                                VAR_INPUT)
            encoder(batch)
            for name, values in recorder.take().items():
                per_view.setdefault(name, []).append(values.clone().view(len(positions), per_image, -1))
    streamed, means, argmax = {}, {}, {}
    for name, parts in per_view.items():
        scalars = view_scalars(torch.cat(parts))
        means[name] = scalars.pop("mean").numpy()
        streamed[name] = {signal: values.numpy() for signal, values in scalars.items()}
        argmax[name] = np.bincount(means[name].argmax(axis=0), minlength=len(images))
    loss = reconstruction_errors(encoder, decoder, as_pixels(images))
    return signal_columns(streamed, means, argmax, np.arange(len(images)), list(per_view), loss)


def detections(results, level: float = 0.05) -> dict[str, bool]:
    """Per signal: the smallest Holm-adjusted p across layers below ``level``."""
    by_signal: dict[str, list[float]] = {}
    for r in results:
        by_signal.setdefault(r.signal, []).append(r.p_value)
    return {signal: min(holm(ps)) < level for signal, ps in by_signal.items()}


def null_rates(columns: dict, n: int, members: int, splits: int, permutations: int) -> dict:
    rng = np.random.default_rng(12345)
    per_column, family = {}, {}
    for split in range(splits):
        is_member = np.zeros(n, dtype=bool)
        is_member[rng.choice(n, members, replace=False)] = True
        results = contrast_signals(columns, is_member, permutations, seed=split)
        for r in results:
            per_column.setdefault(r.signal, []).append(r.p_value < 0.05)
        for signal, found in detections(results).items():
            family.setdefault(signal, []).append(found)
    return {signal: {"per_layer_fpr": float(np.mean(per_column[signal])), "family_fpr": float(np.mean(family[signal])),
                     "splits": splits} for signal in per_column}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--null-splits", type=int, default=60)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="0,25,50,100")
    parser.add_argument("--views", type=int, default=4, help="views per image (the flip recipe: always 2)")
    parser.add_argument("--recipe", default="seed", choices=("seed", "flip", "plain"), help="the view recipe")
    parser.add_argument("--mirror-target", action="store_true",
                        help="memorize with the flipped member as the target too (reconstruction alone; the default, "
                             "as the shipped memorizer, maps a member's mirror image to the member)")
    parser.add_argument("--permutations", type=int, default=999)
    parser.add_argument("--decoder-steps", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if args.quick:
        args.null_splits, args.seeds, args.steps, args.decoder_steps = 5, 1, "0,5", 20
    torch.set_num_threads(args.threads)
    steps = tuple(int(s) for s in args.steps.split(","))
    started = time.perf_counter()
    demo = build_demo(None).float()
    holdout = memorizer_holdout_set(args.image_size)
    if args.quick:
        holdout = ImageSet(holdout.ids[:24], None, args.image_size, DATA_SEED)
    decoder_images = ImageSet.builtin(DECODER_IMAGES, args.image_size, DATA_SEED, start=DECODER_START)
    decoder = fit_decoder(demo, as_pixels(decoder_images), args.decoder_steps, seed=0)

    null = null_rates(columns_of(demo, decoder, holdout, args.views, args.recipe), len(holdout), args.members, args.null_splits,
                      args.permutations)
    print(f"null ({args.null_splits} splits of {args.members} 'members' among {len(holdout)} images never trained "
          f"on; {time.perf_counter() - started:.0f} s):")
    for signal, row in null.items():
        print(f"  {signal:20s} p < 0.05 per (signal, layer): {row['per_layer_fpr']:.3f}; "
              f"any layer after Holm: {row['family_fpr']:.3f}")

    power: dict[int, dict[str, list]] = {step: {} for step in steps}
    for seed in range(args.seeds):
        members = ImageSet.builtin(args.members, args.image_size, DATA_SEED, start=FRESH_START + seed * args.members)
        pool = ImageSet(members.ids + holdout.ids, None, args.image_size, DATA_SEED)
        is_member = np.arange(len(pool)) < len(members)
        encoder = copy.deepcopy(demo)
        kept = memorize(encoder, decoder, as_pixels(members), max(steps), seed, keep_at=steps,
                        mirror_target=args.mirror_target)
        for step in steps:
            encoder.load_state_dict(kept[step])
            results = contrast_signals(columns_of(encoder, decoder, pool, args.views, args.recipe), is_member,
                                       args.permutations, seed=seed)
            for signal, found in detections(results).items():
                power[step].setdefault(signal, []).append(found)
            loss = next(r for r in results if r.signal == "loss" and r.layer == LOSS_LAYER)
            power[step].setdefault("loss_auc", []).append(loss.auc)
            best = {}
            for r in results:
                if r.signal != "loss" and (r.signal not in best or r.auc > best[r.signal].auc):
                    best[r.signal] = r
            power[step].setdefault("best_auc", []).append({s: (r.layer, round(r.auc, 3)) for s, r in best.items()})
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\ndetection rate over {args.seeds} member sets of {args.members} (Holm across layers, 0.05):")
    signals = [s for s in power[steps[0]] if s not in ("loss_auc", "best_auc")]
    print("steps  " + "  ".join(f"{s:>18s}" for s in signals) + "  loss AUC (mean)")
    for step in steps:
        print(f"{step:5d}  " + "  ".join(f"{np.mean(power[step][s]):18.2f}" for s in signals)
              + f"  {np.mean(power[step]['loss_auc']):.3f}")
        print("       best layer AUC per signal:", power[step]["best_auc"])
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "null": null,
                       "power": {str(k): {s: v for s, v in row.items()} for k, row in power.items()}}, handle, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
