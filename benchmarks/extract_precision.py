"""Extraction in bf16 on the CPU: speed against fp32, and what it changes in the benchmark.

Two measurements, both in one run:

1. Speed, interleaved repeats on the same JPEGs (median per path): EfficientNet-Lite0 at 224 px,
   batch 64, channels-last; the model alone on pre-decoded tensors (forward only) and
   ``extract_features`` end to end, each in fp32 and under CPU bf16 autocast. Printed as images/s
   and as ratios (bf16 / fp32; extraction / forward only).
2. Fidelity: the built-in offline benchmark (``oodprobe bench``'s default) run twice, with
   fp32 and with bf16 features, and every detector's AUROC and FPR@95 compared, beside the
   bootstrap 95 % interval half-width of the fp32 run (what the benchmark itself can resolve).

    .venv/bin/python benchmarks/extract_precision.py      # writes results/extract_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract import make_jpeg_folder, time_forward_only
from oodprobe.data import create_dataset
from oodprobe.encoders import create_encoder
from oodprobe.features import autocast_for, extract_features, select_device

RESULTS = Path(__file__).parent / "results" / "extract_precision.json"


def speed(n: int, batch_size: int, repeats: int, folder: Path) -> dict[str, Any]:
    dataset = create_dataset(str(make_jpeg_folder(folder / str(n), n, (640, 480))))
    encoder = create_encoder("efficientnet-lite0")
    device = select_device("cpu")
    paths = {}
    for precision in ("fp32", "bf16"):

        def autocast(precision: str = precision) -> Any:
            return autocast_for(precision, device)

        def extraction(precision: str = precision) -> float:
            start = time.perf_counter()
            extract_features(
                dataset,
                encoder,
                batch_size=batch_size,
                device="cpu",
                precision=precision,  # type: ignore[arg-type]
                use_cache=False,
                progress=False,
            )
            return time.perf_counter() - start

        paths[f"forward only, {precision}"] = lambda autocast=autocast: time_forward_only(
            dataset, encoder, device, autocast, batch_size
        )
        paths[f"extract_features, {precision}"] = extraction
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # interleaved: every path sees the same drift of the machine
        for name, run in paths.items():
            seconds[name].append(run())
    rate = {name: n / float(np.median(values)) for name, values in seconds.items()}
    return {
        "n": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "images_per_second": rate,
        "bf16_over_fp32_forward": rate["forward only, bf16"] / rate["forward only, fp32"],
        "bf16_over_fp32_extraction": rate["extract_features, bf16"]
        / rate["extract_features, fp32"],
        "extraction_over_forward_fp32": rate["extract_features, fp32"] / rate["forward only, fp32"],
        "extraction_over_forward_bf16": rate["extract_features, bf16"] / rate["forward only, bf16"],
    }


def fidelity(cache_root: Path) -> dict[str, Any]:
    from oodprobe.benchmark import execute_benchmark
    from oodprobe.benchmark_spec import create_benchmark

    spec = create_benchmark("offline-default")
    runs = {}
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as output:
            execution = execute_benchmark(
                spec,
                Path(output) / "run",
                cache_root=cache_root,
                device="cpu",
                precision=precision,
                progress=False,
            )
        runs[precision] = {
            (row.context.detector, row.ood_set): row for row in execution.rows if not row.error
        }
    rows = []
    for key, exact in runs["fp32"].items():
        half = runs["bf16"].get(key)
        if half is None:
            continue
        low, high = exact.intervals.get("auroc", (np.nan, np.nan))
        rows.append(
            {
                "detector": key[0],
                "ood_set": key[1],
                "auroc_fp32": exact.metrics["auroc"],
                "auroc_bf16": half.metrics["auroc"],
                "auroc_change": half.metrics["auroc"] - exact.metrics["auroc"],
                "fpr_fp32": exact.metrics["fpr"],
                "fpr_bf16": half.metrics["fpr"],
                "auroc_ci_half_width_fp32": (high - low) / 2,
            }
        )
    changes = np.abs([row["auroc_change"] for row in rows])
    return {
        "benchmark": spec.name,
        "rows": rows,
        "max_abs_auroc_change": float(changes.max()),
        "mean_abs_auroc_change": float(changes.mean()),
        "median_ci_half_width": float(np.median([r["auroc_ci_half_width_fp32"] for r in rows])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/oodprobe-bench-jpegs"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/oodprobe-precision-cache"))
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
    }
    if RESULTS.exists():  # a part skipped keeps its earlier figures
        result = {**json.loads(RESULTS.read_text()), **result}
    if not args.skip_speed:
        result["speed"] = speed(args.n, args.batch_size, args.repeats, args.folder)
        for name, value in result["speed"]["images_per_second"].items():
            print(f"{name:<28}{value:>8.1f} images/s")
        s = result["speed"]
        print(
            f"bf16 / fp32: forward {s['bf16_over_fp32_forward']:.2f}x, extraction "
            f"{s['bf16_over_fp32_extraction']:.2f}x; extraction / forward: fp32 "
            f"{s['extraction_over_forward_fp32']:.2f}, bf16 "
            f"{s['extraction_over_forward_bf16']:.2f}"
        )
    if not args.skip_fidelity:
        result["fidelity"] = fidelity(args.cache)
        f = result["fidelity"]
        for row in f["rows"]:
            print(
                f"{row['detector']:<44}{row['ood_set']:<16}AUROC {100 * row['auroc_fp32']:6.2f} "
                f"-> {100 * row['auroc_bf16']:6.2f} ({100 * row['auroc_change']:+.2f}; CI "
                f"+-{100 * row['auroc_ci_half_width_fp32']:.2f})"
            )
        print(
            f"|AUROC change|: max {100 * f['max_abs_auroc_change']:.2f}, mean "
            f"{100 * f['mean_abs_auroc_change']:.3f} points; median CI half-width "
            f"{100 * f['median_ci_half_width']:.2f} points"
        )
    result["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
