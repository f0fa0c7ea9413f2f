"""Do the audit's 95% jackknife intervals cover as often as they say? A coverage study on the demo.

Each run audits the demo encoder on a fresh sample of its image distribution: ``--memaudit-seed S``
draws new generated images (members and held-out images), new augmentations and a new random
control. For every layer figure with an interval, the study compares the runs' intervals with the
figure's expectation, estimated as the mean of the runs' estimates:

- coverage: the share of (run, layer) intervals that hold the expectation (95% if calibrated);
- se ratio: the mean jackknife se over the standard deviation of the runs' estimates (1 if calibrated);
- cross coverage: the share of (run, other run, layer) where one run's interval holds the other's
  estimate. Two estimates both vary, so a calibrated interval holds another run's estimate with
  probability P(|Z| < 1.96 / sqrt 2), about 83%, not 95%.

The jackknife resamples data points only. Views and the control's random weights also change with
the seed, so a figure that depends on them (the excess over the random control) can vary more than
its interval says; the study shows by how much.

    python benchmarks/coverage.py --seeds 20 --out coverage.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.pipeline.hardware import cpu_flags

FIGURES = ("mean_unitmem", "median_unitmem", "p90_unitmem", "gap", "excess_over_control", "membership_excess")


def figures_of(result) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per figure, per layer: (estimate, se, low, high)."""
    out = {figure: [] for figure in FIGURES}
    for layer in result.layers:
        intervals = dict(layer.intervals)
        intervals["excess_over_control"] = layer.control_excess
        intervals["membership_excess"] = layer.membership.excess_interval
        for figure in FIGURES:
            i = intervals[figure]
            out[figure].append((i.estimate, i.se, i.low, i.high))
    return out


def study(runs: list[dict]) -> dict[str, dict[str, float]]:
    summary = {}
    for figure in FIGURES:
        values = np.array([run[figure] for run in runs])  # (runs, layers, 4)
        estimate, se, low, high = (values[..., k] for k in range(4))
        truth = estimate.mean(axis=0)
        covered = (low <= truth) & (truth <= high)
        cross = [(low[a] <= estimate[b]) & (estimate[b] <= high[a])
                 for a in range(len(runs)) for b in range(len(runs)) if a != b]
        summary[figure] = {
            "coverage": float(covered.mean()),
            "se_ratio": float(np.mean(se.mean(axis=0) / estimate.std(axis=0, ddof=1))),
            "cross_coverage": float(np.mean(cross)),
            "layers": int(values.shape[1]),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200, help="members, and as many held-out images")
    parser.add_argument("--augmentations", type=int, default=10)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    runs, started = [], time.time()
    for seed in range(opts.seeds):
        settings = make_settings(model="demo", data="builtin", holdout="builtin", samples=opts.samples, seed=seed,
                                 augmentations=opts.augmentations, control="random", device="cpu")
        runs.append(figures_of(run_audit(settings)))
        print(f"seed {seed}: {time.time() - started:.0f} s", flush=True)
    summary = study(runs)
    print(f"{'figure':22s} coverage  se ratio  cross coverage   ({opts.seeds} runs x {summary['gap']['layers']} layers)")
    for figure, row in summary.items():
        print(f"{figure:22s} {row['coverage']:8.3f}  {row['se_ratio']:8.2f}  {row['cross_coverage']:14.3f}")
    if opts.out:
        with open(opts.out, "w") as handle:
            json.dump({"summary": summary, "seeds": opts.seeds, "samples": opts.samples, "cpu": cpu_flags(),
                       "wall_s": time.time() - started}, handle, indent=1)


if __name__ == "__main__":
    main()
