"""Extraction speed: oodprobe's pipeline against a plain single-process loop, as ratios.

Both paths decode the same JPEG files, apply the same transform and run the same model with the
same batch size; the plain loop does one thing at a time, oodprobe decodes in worker processes
while the model runs, in channels-last memory layout. The plain loop is timed as a user would
write it (default layout) and with channels-last too, so the two gains (layout, overlap) show
apart. The model alone on pre-decoded tensors (channels-last) is the ceiling.

    .venv/bin/python benchmarks/extract.py                       # 2 cores: EfficientNet-Lite0
    .venv/bin/python benchmarks/extract.py --device cuda --precision fp16 --n 4096
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodprobe.data import create_dataset
from oodprobe.encoders import create_encoder
from oodprobe.features import extract_features, resolve_precision, select_device


def make_jpeg_folder(directory: Path, n: int, size: tuple[int, int]) -> Path:
    """n photo-like JPEGs (crops of scikit-image photos, resized), written once and reused."""
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    if len(list(directory.glob("*.jpg"))) == n:
        return directory
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for index in range(n):
        photo = photos[index % len(photos)]
        top = int(rng.integers(0, photo.shape[0] // 4))
        left = int(rng.integers(0, photo.shape[1] // 4))
        crop = photo[top : top + photo.shape[0] * 3 // 4, left : left + photo.shape[1] * 3 // 4]
        Image.fromarray(crop).resize(size).save(directory / f"{index:05d}.jpg", quality=90)
    return directory


def time_plain_loop(dataset, encoder, device, autocast, batch_size: int, layout) -> float:  # type: ignore[no-untyped-def]
    """Decode → transform → forward, one batch after another in this process."""
    encoder.to(memory_format=layout)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(dataset), batch_size):
            indices = range(first, min(first + batch_size, len(dataset)))
            pixels = torch.stack([encoder.pixel_transform(dataset.load(i)) for i in indices])
            with autocast():
                outputs = encoder(pixels.to(device, memory_format=layout))
            [value.float().cpu() for value in outputs.values()]
    return time.perf_counter() - start


def time_forward_only(dataset, encoder, device, autocast, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """The model alone on tensors decoded beforehand: the ceiling for any pipeline."""
    encoder.to(memory_format=torch.channels_last)
    pixels = torch.stack([encoder.pixel_transform(dataset.load(i)) for i in range(len(dataset))])
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(pixels), batch_size):
            with autocast():
                outputs = encoder(pixels[first : first + batch_size].to(device, non_blocking=True))
            [value.float().cpu() for value in outputs.values()]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="number of images")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="oodprobe decode workers")
    parser.add_argument("--image-width", type=int, default=640)
    parser.add_argument("--image-height", type=int, default=480)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/oodprobe-bench-jpegs"))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per path")
    args = parser.parse_args()

    folder = make_jpeg_folder(
        args.folder / str(args.n), args.n, (args.image_width, args.image_height)
    )
    dataset = create_dataset(str(folder))
    encoder = create_encoder(args.encoder)
    device = select_device(args.device)
    precision = resolve_precision(args.precision, device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast():  # type: ignore[no-untyped-def]
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    encoder.to(device)
    warm = torch.stack([encoder.pixel_transform(dataset.load(0))] * 2).to(device)
    with torch.inference_mode(), autocast():
        encoder(warm)
    if device.type == "cuda":
        torch.cuda.synchronize()

    def ours() -> float:
        start = time.perf_counter()
        result = extract_features(
            dataset,
            encoder,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            precision=precision,
            use_cache=False,
            progress=False,
        )
        assert len(result) == args.n
        return time.perf_counter() - start

    def decode_only() -> float:
        start = time.perf_counter()
        for index in range(len(dataset)):
            encoder.pixel_transform(dataset.load(index))
        return time.perf_counter() - start

    paths = {
        "plain single-process loop": lambda: time_plain_loop(
            dataset, encoder, device, autocast, args.batch_size, torch.contiguous_format
        ),
        "plain loop, channels-last": lambda: time_plain_loop(
            dataset, encoder, device, autocast, args.batch_size, torch.channels_last
        ),
        "oodprobe extract_features": ours,
        "model forward only (ceiling)": lambda: time_forward_only(
            dataset, encoder, device, autocast, args.batch_size
        ),
        "decoding only (one process)": decode_only,
    }
    # Interleaved repeats, median per path: this machine's speed drifts by +-15% over minutes,
    # and interleaving exposes every path to the same drift.
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            seconds[name].append(run())
    median = {name: float(np.median(values)) for name, values in seconds.items()}
    plain, plain_last = median["plain single-process loop"], median["plain loop, channels-last"]
    ours_s, forward = median["oodprobe extract_features"], median["model forward only (ceiling)"]

    n = args.n
    print(
        f"{n} JPEGs {args.image_width}x{args.image_height}, {args.encoder}, batch "
        f"{args.batch_size}, device {device}, precision {precision}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'path':<34}{'images/s (median of ' + str(args.repeats) + ')':>24}")
    for name, value in median.items():
        print(f"{name:<34}{n / value:>24.1f}")
    print(
        f"speed-up over the plain loop: {plain / ours_s:.2f}x (layout and overlap); over the "
        f"channels-last plain loop: {plain_last / ours_s:.2f}x (overlap alone); share of "
        f"forward-only speed: {forward / ours_s:.2f}"
    )


if __name__ == "__main__":
    main()
