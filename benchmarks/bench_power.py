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
import math
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
                                         MEMORIZER_HOLDOUT, build_demo, locate_memorizer, memorizer_decoder,
                                         memorizer_holdout_set, memorizer_member_set)
from pytest_memaudit.metric.membership import CONSTANT_TOLERANCE, permutation_test
from pytest_memaudit.metric.stats import holm
from pytest_memaudit.metric.verdict import (MEMBERSHIP_SIGNAL, SUGGESTIVE_FACTOR, VERDICT_LEVEL, MembershipTest,
                                            corrected, decide)
from pytest_memaudit.models.train_demo import as_pixels, fit_decoder, memorize, reconstruction_errors

LAYERS = var_layer_specs()
FRESH_START = HOLDOUT_START + MEMORIZER_HOLDOUT  # generated images nothing here trained on
NULL_START = FRESH_START + 100_000  # the verdict's null splits draw theirs from here (past the member sets)


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
        argmax[name] = np.bincount(means[name][:, picking(means[name])].argmax(axis=0), minlength=len(images))
    loss = reconstruction_errors(encoder, decoder, as_pixels(images))
    return signal_columns(streamed, means, argmax, np.arange(len(images)), list(per_view), loss)


def picking(means: np.ndarray) -> np.ndarray:
    """The units whose argmax picks an image (``membership.picking_units``'s rule on the view-means
    (images, units)): a constant unit's argmax would be a tie-break, not a pick."""
    values = means.astype(np.float64)
    maximum = values.max(axis=0)
    return maximum - values.mean(axis=0) > CONSTANT_TOLERANCE * np.abs(maximum)


def verdict_tests(columns: dict, is_member: np.ndarray, permutations: int, seed: int) -> list:
    """The audit's verdict family (``audit.subject_verdict``): each layer's argmax-membership test
    (the members' share of the argmax counts against their share of the images, with its permutation
    p) and every (signal, layer) test of the per-image signals and the loss."""
    layers = [layer for signal, layer in columns if signal == "argmax_units"]
    counts = np.stack([columns[("argmax_units", layer)] for layer in layers], axis=1)
    p_values = permutation_test(counts, is_member, permutations, seed)
    excess = counts[is_member].sum(axis=0) / np.maximum(counts.sum(axis=0), 1) - is_member.mean()
    tests = [MembershipTest(MEMBERSHIP_SIGNAL, layer, float(e), math.nan, math.nan, p)
             for layer, e, p in zip(layers, excess, p_values)]
    return tests + contrast_signals(columns, is_member, permutations, seed)


def clopper_pearson(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = 0.0 if hits == 0 else float(beta.ppf(tail, hits, n - hits + 1))
    high = 1.0 if hits == n else float(beta.ppf(1 - tail, hits + 1, n - hits))
    return low, high


def verdict_null(encoder, decoder, splits: int, members: int, heldout: int, views: int, image_size: int,
                 permutations: int, level: float) -> dict:
    """The verdict's false-positive rate: each split draws fresh generated images that neither the
    demo encoder nor the decoder trained on (its own, disjoint from every other split's), makes
    their views with its own view seed, picks ``members`` of them at random as "members", and asks
    the verdict at ``level``. Splits are independent draws of the whole audit's null."""
    rng = np.random.default_rng(2023)
    n = members + heldout
    outcomes, deciding = [], []
    for split in range(splits):
        images = ImageSet.builtin(n, image_size, DATA_SEED, start=NULL_START + split * n)
        is_member = np.zeros(n, dtype=bool)
        is_member[rng.choice(n, members, replace=False)] = True
        columns = columns_of(encoder, decoder, images, views, seed=1000 + split)
        verdict = decide(verdict_tests(columns, is_member, permutations, seed=split), level,
                         permutations=permutations)
        outcomes.append(verdict.memorization)
        deciding.append((verdict.signal, verdict.layer, verdict.p_value))
    detected = sum(o == "detected" for o in outcomes)
    flagged = sum(o != "none" for o in outcomes)
    return {"splits": splits, "members": members, "heldout": heldout, "level": level,
            "suggestive": SUGGESTIVE_FACTOR * level, "detected": detected, "inconclusive_or_detected": flagged,
            "detected_interval": clopper_pearson(detected, splits),
            "flagged_interval": clopper_pearson(flagged, splits),
            "smallest_corrected_p": sorted(p for _, _, p in deciding)[:5], "deciding": deciding}


def view_seed_spread(seeds: int, views: int, permutations: int, level: float) -> list[dict]:
    """The shipped ``demo_memorizer`` audited as ``--memaudit-model demo_memorizer`` does (its members
    against its held-out set, 64x64, ``views`` views each, the seed recipe), once per view seed: the
    verdict and the argmax-membership test's smallest corrected p (the loss uses the plain image,
    the same for every view seed)."""
    encoder, decoder = build_demo(locate_memorizer(None)).float(), memorizer_decoder()
    members, holdout = memorizer_member_set(), memorizer_holdout_set()
    pool = ImageSet(members.ids + holdout.ids, None, members.size, DATA_SEED)
    is_member = np.arange(len(pool)) < len(members)
    rows = []
    for seed in range(seeds):
        tests = verdict_tests(columns_of(encoder, decoder, pool, views, seed=seed), is_member, permutations, seed=0)
        verdict = decide(tests, level, permutations=permutations)
        by_signal = {}  # each signal's smallest raw p: (layer, raw p, corrected p)
        for t, q in zip(tests, corrected(tests)):
            if math.isfinite(t.p_value) and (t.signal not in by_signal or t.p_value < by_signal[t.signal][1]):
                by_signal[t.signal] = (t.layer, t.p_value, q)
        rows.append({"view_seed": seed, "verdict": verdict.memorization, "p": verdict.p_value,
                     "signal": verdict.signal, "layer": verdict.layer, "by_signal": by_signal})
        print(f"  view seed {seed}: {verdict.memorization} ({verdict.signal} at {verdict.layer}, corrected p "
              f"{verdict.p_value:.2g}); smallest raw p (corrected) per signal: "
              + ", ".join(f"{s} {p:.2g} ({q:.2g}) at {layer}" for s, (layer, p, q) in by_signal.items()), flush=True)
    return rows


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
    parser.add_argument("--parts", default="signals,power,verdict,view-seeds",
                        help="which to run, of signals (their null), power, verdict (its null), view-seeds")
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
    parser.add_argument("--verdict-splits", type=int, default=100, help="independent null audits for the verdict")
    parser.add_argument("--verdict-heldout", type=int, default=48, help="held-out images of each null audit")
    parser.add_argument("--verdict-permutations", type=int, default=10_000, help="as the audit's default")
    parser.add_argument("--level", type=float, default=VERDICT_LEVEL, help="the verdict's level")
    parser.add_argument("--view-seeds", type=int, default=8, help="view seeds of the shipped memorizer's audit")
    parser.add_argument("--memorizer-views", type=int, default=10, help="its views per image (the audit's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if args.quick:
        args.null_splits, args.seeds, args.steps, args.decoder_steps = 5, 1, "0,5", 20
        args.verdict_splits, args.verdict_heldout, args.view_seeds, args.memorizer_views = 3, 16, 2, 2
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    steps = tuple(int(s) for s in args.steps.split(","))
    started = time.perf_counter()
    demo = build_demo(None).float()
    holdout = memorizer_holdout_set(args.image_size)
    if args.quick:
        holdout = ImageSet(holdout.ids[:24], None, args.image_size, DATA_SEED)
    decoder_images = ImageSet.builtin(DECODER_IMAGES, args.image_size, DATA_SEED, start=DECODER_START)
    decoder = fit_decoder(demo, as_pixels(decoder_images), args.decoder_steps, seed=0)
    rows: dict = {"args": vars(args)}

    if "verdict" in parts:
        rows["verdict_null"] = null = verdict_null(demo, decoder, args.verdict_splits, args.members,
                                                   args.verdict_heldout, args.views, args.image_size,
                                                   args.verdict_permutations, args.level)
        print(f"verdict null ({null['splits']} audits of {args.members} members and {args.verdict_heldout} held-out "
              f"images, fresh images and views each, {args.verdict_permutations:,} permutations; "
              f"{time.perf_counter() - started:.0f} s):")
        for name, key, interval in (("detected", "detected", "detected_interval"),
                                    ("inconclusive or detected", "inconclusive_or_detected", "flagged_interval")):
            low, high = null[interval]
            print(f"  {name:25s} {null[key]}/{null['splits']} = {null[key] / null['splits']:.3f} "
                  f"[{low:.3f}, {high:.3f}] (Clopper-Pearson 95%)")
        print(f"  smallest corrected p over the splits: {null['smallest_corrected_p']}", flush=True)

    if "view-seeds" in parts:
        print(f"demo_memorizer over {args.view_seeds} view seeds ({args.memorizer_views} views per image):")
        rows["view_seeds"] = view_seed_spread(args.view_seeds, args.memorizer_views, args.verdict_permutations,
                                              args.level)

    if "signals" in parts:
        columns = columns_of(demo, decoder, holdout, args.views, args.recipe)
        rows["null"] = null = null_rates(columns, len(holdout), args.members, args.null_splits, args.permutations)
        print(f"null ({args.null_splits} splits of {args.members} 'members' among {len(holdout)} images never "
              f"trained on; {time.perf_counter() - started:.0f} s):")
        for signal, row in null.items():
            print(f"  {signal:20s} p < 0.05 per (signal, layer): {row['per_layer_fpr']:.3f}; "
                  f"any layer after Holm: {row['family_fpr']:.3f}")

    if "power" in parts:
        rows["power"] = power_rows(demo, decoder, holdout, steps, args, started)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1, default=str)


def power_rows(demo, decoder, holdout: ImageSet, steps: tuple[int, ...], args, started: float) -> dict:
    """Detection rate of each signal and of the verdict against memorization steps."""
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
            columns = columns_of(encoder, decoder, pool, args.views, args.recipe)
            results = contrast_signals(columns, is_member, args.permutations, seed=seed)
            for signal, found in detections(results).items():
                power[step].setdefault(signal, []).append(found)
            verdict = decide(verdict_tests(columns, is_member, args.verdict_permutations, seed), args.level,
                             permutations=args.verdict_permutations)
            power[step].setdefault("verdict", []).append(verdict.memorization == "detected")
            loss = next(r for r in results if r.signal == "loss" and r.layer == LOSS_LAYER)
            power[step].setdefault("loss_auc", []).append(loss.auc)
            best = {}
            for r in results:
                if r.signal != "loss" and (r.signal not in best or r.auc > best[r.signal].auc):
                    best[r.signal] = r
            power[step].setdefault("best_auc", []).append({s: (r.layer, round(r.auc, 3)) for s, r in best.items()})
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\ndetection rate over {args.seeds} member sets of {args.members} (signals: Holm across layers, 0.05; "
          f"verdict: detected at {args.level:g}):")
    signals = [s for s in power[steps[0]] if s not in ("loss_auc", "best_auc")]
    print("steps  " + "  ".join(f"{s:>18s}" for s in signals) + "  loss AUC (mean)")
    for step in steps:
        print(f"{step:5d}  " + "  ".join(f"{np.mean(power[step][s]):18.2f}" for s in signals)
              + f"  {np.mean(power[step]['loss_auc']):.3f}")
        print("       best layer AUC per signal:", power[step]["best_auc"])
    return {str(k): dict(row) for k, row in power.items()}


if __name__ == "__main__":
    main()
