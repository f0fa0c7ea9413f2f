"""What a full-training-set audit costs outside the forward passes: listing the data, and the
results JSON and HTML report of 1.28M data points. No model runs.

Run from the repository root::

    python benchmarks/bench_scale.py                       # 100k files, 100k tar members, 1,281,167 data points
    python benchmarks/bench_scale.py --files 1281167       # list as many files as ImageNet's training set

1. Listing: a generated tree of ``--files`` empty files in 1,000 class folders (ImageNet's
   layout), listed by ``list_image_files`` and opened as the audit opens it (``open_images``:
   listing, sampling order, labels and error-bar groups for every data point).
2. Tar shards: ``--members`` members (image files of 100 bytes, each with a ``.cls`` beside it)
   in shards of 1,000, listed by ``tarshards.list_tar_images`` (headers only).
3. Results: an ``AuditResult`` of ``--points`` data points and var_d16's 22 layers (8,192 units,
   top-10) and per data point scores and characteristics; the time its "what gets memorized"
   analysis takes; the result written by ``write_json_atomic``; its size, ``json.load`` and ``AuditResult.from_json``
   times; the HTML report of it (``--memaudit-gallery names``: no thumbnails to decode).

Warm file-system cache: every listing runs 3 times, the best and the median are reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_memaudit.pipeline.setup import open_images  # noqa: E402
from pytest_memaudit.data.characteristics import CHARACTERISTICS  # noqa: E402
from pytest_memaudit.pipeline.settings import make_settings  # noqa: E402
from pytest_memaudit.data.images import list_image_files  # noqa: E402
from pytest_memaudit.analysis.datapoints import DataPoints, what_gets_memorized  # noqa: E402
from pytest_memaudit.models import get_model_spec  # noqa: E402
from pytest_memaudit.report import write_html  # noqa: E402
from pytest_memaudit.results.result import AuditResult, LayerResult, write_json_atomic  # noqa: E402
from pytest_memaudit.metric.stats import layer_stats  # noqa: E402
from pytest_memaudit.data.tarshards import list_tar_images, tar_shards  # noqa: E402
from pytest_memaudit.metric.unitmem import UnitMemValues  # noqa: E402

# var_d16's audited layers and their units (ch 160, channel multipliers 1, 1, 2, 2, 4; z 32)
VAR_D16_UNITS = [160, 160, 160, 160, 160, 160, 160, 320, 320, 320, 320, 320, 320, 640, 640, 640, 640, 640, 640,
                 640, 640, 32]


def timed(function, repeats: int = 3) -> tuple[float, float, object]:
    """Best and median seconds of ``repeats`` calls, and the last call's result."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        seconds.append(time.perf_counter() - started)
    return min(seconds), statistics.median(seconds), value


def file_tree(root: Path, files: int, folders: int = 1000) -> Path:
    if root.exists() and sum(1 for _ in root.iterdir()) == folders:
        return root
    for f in range(folders):
        folder = root / f"n{f:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(f * files // folders, (f + 1) * files // folders):
            (folder / f"n{f:08d}_{i}.JPEG").touch()
    return root


def tar_tree(root: Path, members: int, per_shard: int = 1000) -> Path:
    if root.exists() and tar_shards(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    payload = bytes(100)
    for s in range(0, members, per_shard):
        with tarfile.open(root / f"train-{s // per_shard:06d}.tar", "w") as archive:
            for i in range(s, min(s + per_shard, members)):
                for name, data in ((f"{i:08d}.jpg", payload), (f"{i:08d}.cls", b"7")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return root


def synthetic_result(points: int, topk: int = 10) -> tuple[AuditResult, float]:
    """The result, and the seconds ``what_gets_memorized`` took."""
    rng = np.random.default_rng(0)
    layers = []
    for i, units in enumerate(VAR_D16_UNITS):
        unitmem = rng.uniform(0.2, 0.9, units)
        values = UnitMemValues(unitmem, rng.uniform(1, 2, units), rng.uniform(0, 1, units),
                               rng.integers(0, points, units), np.zeros(units, dtype=bool),
                               np.sort(rng.uniform(0, 2, (topk, units)), axis=0)[::-1],
                               rng.integers(0, points, (topk, units)))
        layers.append(LayerResult(f"layer.{i}", f"layer_{i}", values, layer_stats(unitmem, values.dead)))
    samples = [f"n{i // 1281:08d}/n{i // 1281:08d}_{i}.JPEG" for i in range(points)]
    labels = ["member"] * points
    # Per data point: every unit's argmax somewhere, characteristics for every image (what
    # "what gets memorized" stores), scored and analysed as an audit would.
    layer_units = {layer.name: np.bincount(layer.values.max_sample, minlength=points) for layer in layers}
    argmax_units = sum(layer_units.values())
    unitmem = {layer.name: layer.values.unitmem for layer in layers}
    score = sum(np.bincount(layer.values.max_sample, weights=unitmem[layer.name], minlength=points) for layer in layers)
    best_rank = np.where(argmax_units > 0, 1.0, np.nan)
    characteristics = {name: rng.uniform(0, 1, points) for name in CHARACTERISTICS}
    data_points = DataPoints(score, argmax_units, best_rank, layer_units, characteristics)
    embedding = rng.gamma(2, 1, (points, 32))
    started = time.perf_counter()
    memorized = what_gets_memorized(data_points, labels, samples, embedding, "layer.21", 0)
    analysed = time.perf_counter() - started
    return AuditResult(model="var_d16", settings={"reduce": "mean", "image_size": 256, "views_per_image": 10},
                       data_source="/data/imagenet/train", samples=samples, layers=layers,
                       labels=labels, memorized=memorized,
                       distributed={"world_size": 8, "backend": "nccl", "shards": [points // 8] * 8}), analysed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--points", type=int, default=1_281_167)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="memaudit-bench-scale-"))
    print(f"load average {os.getloadavg()[0]:.1f}")

    tree = file_tree(workdir / f"tree-{args.files}", args.files)
    best, median, ids = timed(lambda: list_image_files(tree))
    print(f"list_image_files, {len(ids):,} files: best {best:.2f} s, median {median:.2f} s "
          f"({best / len(ids) * 1.281167e6:.1f} s per 1.28M at the best rate)")
    settings = make_settings(model="var_d16", data=str(tree))
    best, median, images = timed(lambda: open_images(settings, get_model_spec("var_d16"), 256))
    print(f"open_images (listing, labels, groups), {len(images):,} data points: best {best:.2f} s, median {median:.2f} s "
          f"({best / len(images) * 1.281167e6:.1f} s per 1.28M)")

    shards_dir = tar_tree(workdir / f"tars-{args.members}", args.members)
    shards = tar_shards(shards_dir)
    best, median, listed = timed(lambda: list_tar_images(shards_dir, shards))
    print(f"list_tar_images, {len(shards)} shards, {len(listed[0]):,} images: best {best:.2f} s, median "
          f"{median:.2f} s ({best / len(listed[0]) * 1.281167e6:.1f} s per 1.28M)")

    result, analysed = synthetic_result(args.points)
    print(f"what gets memorized (correlations, clusters, {args.points // 1281:,} classes), {args.points:,} data points: "
          f"{analysed:.1f} s")
    path = workdir / "results.json"
    started = time.perf_counter()
    write_json_atomic(path, result.to_json())
    written = time.perf_counter() - started
    best, median, document = timed(lambda: json.loads(path.read_text()))
    from_best, _, _ = timed(lambda: AuditResult.from_json(document), repeats=1)
    print(f"results.json, {args.points:,} data points: {path.stat().st_size / 2**20:.1f} MB, written in {written:.1f} s, "
          f"json.load best {best:.2f} s (median {median:.2f} s), from_json {from_best:.2f} s")
    report = workdir / "report.html"
    started = time.perf_counter()
    write_html(report, result, None, "names")
    print(f"report.html (gallery names): {report.stat().st_size / 2**20:.2f} MB in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
