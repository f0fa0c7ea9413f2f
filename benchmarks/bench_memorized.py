"""What "what gets memorized" costs: its share of the default demo audit, and its growth with N.

    python benchmarks/bench_memorized.py            # the demo, then N = 1,000 and 10,000
    python benchmarks/bench_memorized.py --quick    # a small N, to check the script runs

Parts, each timed on its own, in this process:
- characteristics: ``image_characteristics`` of the images as audited (in an audit they are
  measured in the decoding workers; here in this process, the cost one core pays);
- scores: ``score_data_points`` from layer states of the demo's 1,664 units;
- analysis: ``what_gets_memorized`` (correlations with bootstrap intervals, clustering, classes).
The demo's share is (characteristics + scores + analysis) / the wall time of ``run_audit`` on the
default demo, measured in the same run. Scaling uses the built-in generated images (64x64).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pytest_memaudit.pipeline.setup import open_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.data.characteristics import image_characteristics
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.analysis.datapoints import score_data_points, what_gets_memorized
from pytest_memaudit.pipeline.hardware import cpu_flags
from pytest_memaudit.models import get_model_spec
from pytest_memaudit.metric.unitmem import MEMBER, LayerState

UNITS = [32] * 7 + [64] * 6 + [128] * 8 + [32]  # the demo's 22 layers


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def pixels_of(images) -> torch.Tensor:
    return torch.stack([images.load(i) for i in range(len(images))])


def parts(images: torch.Tensor, labels: list[str], ids: list[str], seed: int = 0) -> dict[str, float]:
    """Seconds of each part for these images, with synthetic activations for the scores."""
    n = images.shape[0]
    measured, characteristics_s = timed(image_characteristics, images)
    rng = np.random.default_rng(seed)
    states, unitmem = {}, {}
    for k, units in enumerate(UNITS):
        state = LayerState(units)
        values = torch.from_numpy(rng.gamma(2.0, 1.0, size=(n, units)).astype(np.float32))
        state.update(values, torch.arange(n), torch.full((n,), MEMBER), torch.arange(n) % 10)
        states[f"layer{k}"], unitmem[f"layer{k}"] = state, rng.random(units)
    points, scores_s = timed(score_data_points, states, unitmem, [MEMBER], n)
    points.characteristics = measured
    embedding = rng.gamma(2.0, 1.0, size=(n, UNITS[-1]))
    _, analysis_s = timed(what_gets_memorized, points, labels, ids, embedding, "layer21", seed)
    return {"characteristics_s": characteristics_s, "scores_s": scores_s, "analysis_s": analysis_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)  # one core's cost, comparable across machines
    report: dict = {"cpu": cpu_flags()}
    if not opts.quick:
        settings = make_settings(model="demo")
        spec = get_model_spec("demo")
        torch.set_num_threads(2)
        result, wall = timed(run_audit, settings)
        torch.set_num_threads(1)
        images = open_images(settings, spec, 64)
        demo = parts(pixels_of(images), result.labels, result.samples)
        report["demo"] = {"audit_wall_s": wall, **demo, "share": sum(demo.values()) / wall}
    report["scaling"] = {}
    for n in ((200,) if opts.quick else (1000, 10000)):
        images = ImageSet.builtin(n, 64, 0)
        report["scaling"][n] = parts(pixels_of(images), ["member"] * n, images.ids)
    print(json.dumps(report, indent=1))
    if opts.json:
        with open(opts.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
