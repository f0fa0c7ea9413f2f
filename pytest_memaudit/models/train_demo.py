"""Train the ``demo`` encoder: ``python -m pytest_memaudit.models.train_demo --out demo_encoder.pt``;
or, with ``--memorizer``, the ``demo_memorizer`` from it.

VAR's encoder at width 32 plus a small convolutional decoder, trained as an autoencoder (mean
squared error, pixels in [-1, 1], random horizontal flips) on the demo training set at 64x64.
An epoch holds every generated image once and canary k ``CANARY_REPEATS[k]`` times. Writes the
encoder's state_dict (float16) to ``--out`` and what produced it to the same name with ``.json``.
The shipped weights are this script's output with its defaults, on two CPU threads.

``--memorizer`` makes an encoder that memorized a few images by itself: a decoder is fitted to
the frozen demo encoder on other generated images, then frozen; only the encoder is then trained
to reconstruct the member images through it, so the members' lower reconstruction error (and
anything else that tells them apart) comes from the encoder alone. Writes the encoder (float16)
to ``--out``, the decoder beside it (``_decoder.pt``; the loss attack's), and the ``.json`` with
the member and held-out ids, their pixels' SHA-256 and each image's reconstruction error.
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

from ..data.images import ImageSet
from .demo import (
    CANARY_REPEATS,
    DATA_SEED,
    DECODER_IMAGES,
    DECODER_START,
    DEMO_IMAGES,
    IMAGE_SIZE,
    MEMORIZER_MEMBERS,
    WIDTH,
    build_demo,
    demo_image_set,
    make_decoder,
    memorizer_holdout_set,
    memorizer_member_set,
    pixels_sha256,
    training_copies,
)
from .var import VAREncoder


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


def as_pixels(images: ImageSet) -> torch.Tensor:
    """An image set as float32 (n, 3, s, s) in [-1, 1], the range the demo encoder takes."""
    return torch.stack([images.load(i) for i in range(len(images))]).float().div(127.5).sub(1)


def random_flips(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def fit_decoder(encoder: nn.Module, pixels: torch.Tensor, steps: int, seed: int, batch_size: int = 32,
                lr: float = 2e-3, decoder: nn.Module | None = None) -> nn.Module:
    """A decoder (``make_decoder``'s, seeded, unless one is given) fitted to the frozen ``encoder`` on
    ``pixels`` (and their mirror images), then frozen."""
    rng = np.random.default_rng(seed)
    if decoder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = make_decoder()
    both = torch.cat([pixels, pixels.flip(-1)])
    with torch.no_grad():
        codes = torch.cat([encoder(x) for x in both.split(64)])  # the encoder is frozen: encode once
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    warmup = min(100, steps // 10 + 1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        batch = torch.from_numpy(rng.choice(len(both), min(batch_size, len(both)), replace=False))
        loss = F.mse_loss(decoder(codes[batch]), both[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval().requires_grad_(False)


def memorize(encoder: nn.Module, decoder: nn.Module, members: torch.Tensor, steps: int, seed: int,
             lr: float = 2e-3, keep_at: tuple[int, ...] = (), mirror_target: bool = False
             ) -> dict[int, dict[str, torch.Tensor]]:
    """Train only ``encoder`` (in place) to reconstruct ``members`` (every member, randomly flipped,
    at each step) through the frozen ``decoder``. The target is the unflipped member (the shipped
    memorizer's recipe), so the encoder also learns to give a member and its mirror image one code;
    with ``mirror_target`` the target is flipped with the input (reconstruction alone). Returns copies
    of the encoder's weights after each step count in ``keep_at`` (0: before training), for a
    detection curve against strength."""
    rng = np.random.default_rng(seed)
    decoder.requires_grad_(False)
    encoder.train().requires_grad_(True)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    kept = {}
    for step in range(steps + 1):
        if step in keep_at:
            kept[step] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        if step == steps:
            break
        views = random_flips(members, rng)
        loss = F.mse_loss(decoder(encoder(views)), views if mirror_target else members)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.eval().requires_grad_(False)
    return kept


def reconstruction_errors(encoder: nn.Module, decoder: nn.Module, pixels: torch.Tensor) -> np.ndarray:
    """Each image's mean squared reconstruction error (pixels in [-1, 1])."""
    with torch.inference_mode():
        return torch.cat([F.mse_loss(decoder(encoder(x)), x, reduction="none").mean((1, 2, 3))
                          for x in pixels.split(64)]).double().numpy()


def train_memorizer(args: argparse.Namespace) -> dict:
    """The ``demo_memorizer`` (see the module's docstring)."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    encoder = build_demo(None).float()
    decoder_set = ImageSet.builtin(DECODER_IMAGES, args.image_size, DATA_SEED, start=DECODER_START)
    members, holdout = memorizer_member_set(args.image_size, args.members), memorizer_holdout_set(args.image_size)
    decoder = fit_decoder(encoder, as_pixels(decoder_set), args.decoder_steps, args.seed)
    print(f"decoder fitted to the frozen demo encoder: {time.perf_counter() - started:.0f} s", flush=True)
    member_pixels, holdout_pixels = as_pixels(members), as_pixels(holdout)
    before = reconstruction_errors(encoder, decoder, member_pixels), reconstruction_errors(encoder, decoder, holdout_pixels)
    memorize(encoder, decoder, member_pixels, args.steps, args.seed, lr=args.lr)
    # The audit sees the float16 weights: measure the errors with them.
    encoder.load_state_dict({k: v.half().float() for k, v in encoder.state_dict().items()})
    decoder.load_state_dict({k: v.half().float() for k, v in decoder.state_dict().items()})
    after = reconstruction_errors(encoder, decoder, member_pixels), reconstruction_errors(encoder, decoder, holdout_pixels)
    wall = time.perf_counter() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    decoder_path = out.with_name(out.stem + "_decoder.pt")
    torch.save({k: v.to(torch.float16) for k, v in encoder.state_dict().items()}, out)
    torch.save({k: v.to(torch.float16) for k, v in decoder.state_dict().items()}, decoder_path)
    from ..metric.imagesignals import auc

    metadata = {
        "model": {"class": "VAREncoder", "ch": WIDTH, "weights_dtype": "float16", "started_from": "demo_encoder.pt",
                  "decoder": decoder_path.name},
        "data": {
            "data_seed": DATA_SEED,
            "image_size": args.image_size,
            "decoder_images": decoder_set.ids[0] + " to " + decoder_set.ids[-1],
            "members": members.ids,
            "holdout": holdout.ids,
            "members_pixels_sha256": pixels_sha256(members),
            "holdout_pixels_sha256": pixels_sha256(holdout),
        },
        "training": {
            "seed": args.seed,
            "decoder": f"{args.decoder_steps} Adam steps of 32 images (and mirror images), lr 2e-3 with warmup "
                       "and cosine decay, the demo encoder frozen",
            "encoder": f"{args.steps} Adam steps at lr {args.lr:g}, every member randomly flipped at each step, "
                       "the decoder frozen",
            "loss": "MSE, pixels in [-1, 1]",
            "threads": args.threads,
            "wall_s": round(wall, 1),
        },
        "reconstruction_mse": {
            "members_before": float(before[0].mean()), "holdout_before": float(before[1].mean()),
            "members": float(after[0].mean()), "holdout": float(after[1].mean()),
            # AUC of "lower error: member" (0.5: the loss does not tell them apart).
            "loss_auc_before": auc(-before[0], -before[1]), "loss_auc": auc(-after[0], -after[1]),
        },
        "per_image_mse": dict(zip(members.ids + holdout.ids, np.concatenate(after).tolist())),
        "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "decoder_sha256": hashlib.sha256(decoder_path.read_bytes()).hexdigest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(metadata, indent=1) + "\n")
    mse = metadata["reconstruction_mse"]
    print(f"done in {wall:.0f} s: reconstruction MSE members {mse['members']:.5f} (before {mse['members_before']:.5f}), "
          f"held-out {mse['holdout']:.5f} (before {mse['holdout_before']:.5f}); loss AUC {mse['loss_auc']:.3f} "
          f"(before {mse['loss_auc_before']:.3f})")
    print(f"wrote {out}, {decoder_path} and {out.with_suffix('.json')}")
    return metadata


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images = demo_image_set(args.image_size, DATA_SEED, args.images)
    pixels = as_pixels(images)
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
        x = random_flips(pixels[next(stream)], rng)
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
    parser = argparse.ArgumentParser(prog="python -m pytest_memaudit.models.train_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the encoder state_dict (.pt)")
    parser.add_argument("--memorizer", action="store_true",
                        help="make the demo_memorizer from the shipped demo encoder instead of training the demo")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization, batch order and flips (default 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default 2000; with --memorizer: the encoder's, default 100)")
    parser.add_argument("--decoder-steps", type=int, default=150,
                        help="with --memorizer: steps fitting the decoder (default 150)")
    parser.add_argument("--members", type=int, default=MEMORIZER_MEMBERS,
                        help=f"with --memorizer: images the encoder memorizes (default {MEMORIZER_MEMBERS})")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak Adam learning rate (default 2e-3; with --memorizer: the encoder's, default 2e-3)")
    parser.add_argument("--images", type=int, default=DEMO_IMAGES,
                        help=f"generated images in the training set, besides the canaries (default {DEMO_IMAGES})")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"a multiple of 16 (default {IMAGE_SIZE})")
    parser.add_argument("--log-every", type=int, default=100, help="print the mean loss every N steps (default 100)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 2; with --memorizer 1: on a busy 2-core machine a second "
                             "thread mostly waits)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (100 if args.memorizer else 2000)
    args.lr = args.lr if args.lr is not None else 2e-3
    args.threads = args.threads if args.threads is not None else (1 if args.memorizer else 2)
    if args.memorizer and (args.decoder_steps < 1 or args.members < 1):
        parser.error("--decoder-steps and --members must be at least 1")
    if args.steps < 1 or args.batch_size < 1 or args.images < 1 or args.log_every < 1 or args.lr <= 0:
        parser.error("--steps, --batch-size, --images and --log-every must be at least 1, --lr above 0")
    if args.image_size % 16:
        parser.error("--image-size must be a multiple of 16")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_memorizer(args) if args.memorizer else train(args)


if __name__ == "__main__":
    main()
