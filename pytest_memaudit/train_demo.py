"""Train the ``demo`` encoder: ``python -m pytest_memaudit.train_demo --out demo_encoder.pt``.

VAR's encoder at width 32 plus a small convolutional decoder, trained as an autoencoder (mean
squared error, pixels in [-1, 1], random horizontal flips) on the demo training set at 64x64.
An epoch holds every generated image once and canary k ``CANARY_REPEATS[k]`` times. Writes the
encoder's state_dict (float16) to ``--out`` and what produced it to the same name with ``.json``.
The shipped weights are this script's output with its defaults, on two CPU threads.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.demo import (
    CANARY_REPEATS,
    DATA_SEED,
    DEMO_IMAGES,
    IMAGE_SIZE,
    WIDTH,
    demo_image_set,
    pixels_sha256,
    training_copies,
)
from .models.var import VAREncoder


def make_decoder(z_channels: int = 32) -> nn.Sequential:
    """z (z_channels x s/16 x s/16) to an image: four nearest-upsample + conv stages."""
    layers: list[nn.Module] = [nn.Conv2d(z_channels, 128, 3, padding=1), nn.SiLU()]
    for c_in, c_out in ((128, 128), (128, 64), (64, 32), (32, 32)):
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(32, 3, 3, padding=1))
    return nn.Sequential(*layers)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batches(epoch_positions: list[int], batch_size: int, rng: np.random.Generator):
    """Endless batches of positions: each epoch a fresh shuffle of ``epoch_positions``."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += rng.permutation(epoch_positions).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images = demo_image_set(args.image_size, DATA_SEED, args.images)
    pixels = torch.stack([images.load(i) for i in range(len(images))]).float().div(127.5).sub(1)
    encoder, decoder = VAREncoder(ch=WIDTH), make_decoder()
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    warmup = min(100, args.steps // 10 + 1)

    curve, window = [], []
    started = time.perf_counter()
    stream = batches(training_copies(images), args.batch_size, rng)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        x = pixels[next(stream)]
        flip = torch.from_numpy(rng.random(len(x)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.mse_loss(decoder(encoder(x)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = float(np.mean(window))
            curve.append([step + 1, mean])
            window = []
            elapsed = time.perf_counter() - started
            print(f"step {step + 1:5d}/{args.steps}  loss {mean:.5f}  {elapsed:6.0f} s", flush=True)
    wall = time.perf_counter() - started

    with torch.inference_mode():
        errors = torch.cat(
            [F.mse_loss(decoder(encoder(x)), x, reduction="none").mean((1, 2, 3)) for x in pixels.split(64)]
        ).tolist()
    per_image = dict(zip(images.ids, errors))
    builtin_mse = float(np.mean([e for id_, e in per_image.items() if id_ not in images.canaries]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.float16) for k, v in encoder.state_dict().items()}, out)
    metadata = {
        "model": {"class": "VAREncoder", "ch": WIDTH, "weights_dtype": "float16"},
        "data": {
            "description": images.description,
            "image_size": args.image_size,
            "generated_images": args.images,
            "data_seed": DATA_SEED,
            "pixels_sha256": pixels_sha256(images),
            "canaries": [
                {"id": id_, "repeats_per_epoch": repeats, "final_mse": per_image[id_]}
                for id_, repeats in zip(images.canaries, CANARY_REPEATS)
            ],
        },
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "schedule": f"linear warmup {warmup} steps, cosine to lr/10",
            "optimizer": "Adam",
            "loss": "MSE, pixels in [-1, 1]",
            "augmentation": "random horizontal flip",
            "epochs": round(args.steps * args.batch_size / len(training_copies(images)), 1),
            "threads": args.threads,
            "wall_s": round(wall, 1),
        },
        "loss_curve": curve,
        "final_loss": curve[-1][1],
        "final_mse_generated_images": builtin_mse,
        "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(metadata, indent=1) + "\n")

    print(f"done: {args.steps} steps ({metadata['training']['epochs']} epochs) in {wall:.0f} s; "
          f"final loss {curve[-1][1]:.5f} (mean over the last log interval)")
    print(f"reconstruction MSE: generated images {builtin_mse:.5f}; canaries " + ", ".join(
        f"{c['id']} (x{c['repeats_per_epoch']}) {c['final_mse']:.5f}" for c in metadata["data"]["canaries"]))
    print(f"wrote {out} ({out.stat().st_size:,} bytes) and {out.with_suffix('.json')}")
    return metadata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pytest_memaudit.train_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the encoder state_dict (.pt)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization, batch order and flips (default 0)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default 2e-3)")
    parser.add_argument("--images", type=int, default=DEMO_IMAGES,
                        help=f"generated images in the training set, besides the canaries (default {DEMO_IMAGES})")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"a multiple of 16 (default {IMAGE_SIZE})")
    parser.add_argument("--log-every", type=int, default=100, help="print the mean loss every N steps (default 100)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.images < 1 or args.log_every < 1 or args.lr <= 0:
        parser.error("--steps, --batch-size, --images and --log-every must be at least 1, --lr above 0")
    if args.image_size % 16:
        parser.error("--image-size must be a multiple of 16")
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
