"""A depth sweep in one forward pass against one extraction per block, as a ratio.

`oodprobe study` (and `bench`) serve encoders that are blocks of one model at one input size
with a single forward pass per image. The reference is what a user would otherwise run: one
extraction per encoder name. Both read the same built-in images, without the cache, and the
script checks that they give the same arrays.

    .venv/bin/python benchmarks/shared_pass.py                   # 2 cores, Lite0 at 112 px
    .venv/bin/python benchmarks/shared_pass.py --model efficientnet-lite2 --n 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from oodprobe.data import create_dataset
from oodprobe.encoders import create_encoder, create_shared_encoder
from oodprobe.features import extract_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--blocks", default="5,11", help="comma list of block indices")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--n", type=int, default=1000, help="Fashion-MNIST training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    names = [f"{args.model}/block{b}@{args.size}" for b in args.blocks.split(",")]
    names.append(f"{args.model}@{args.size}")
    dataset = create_dataset("fashion-mnist:train", limit=args.n, seed=0)
    options = {"batch_size": args.batch_size, "num_workers": args.workers, "use_cache": False}

    started = time.perf_counter()
    shared, outputs = create_shared_encoder(names)
    together = extract_features(dataset, shared, progress=False, **options)  # type: ignore[arg-type]
    shared_seconds = time.perf_counter() - started
    del shared

    separate_seconds = 0.0
    largest_difference = 0.0
    for name in names:
        started = time.perf_counter()
        alone = extract_features(dataset, create_encoder(name), progress=False, **options)  # type: ignore[arg-type]
        separate_seconds += time.perf_counter() - started
        difference = np.abs(alone.features - together.arrays[outputs[name]]).max()
        largest_difference = max(largest_difference, float(difference))

    print(f"{len(names)} encoders ({', '.join(names)}), {len(dataset)} images")
    print(f"one forward pass:        {shared_seconds:7.1f} s")
    print(f"one pass per encoder:    {separate_seconds:7.1f} s")
    print(f"ratio (separate/shared): {separate_seconds / shared_seconds:7.2f}x")
    print(f"max |difference| of the features: {largest_difference:.2e}")


if __name__ == "__main__":
    main()
