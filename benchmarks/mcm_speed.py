"""MCM scoring speed: the in-place float64 path vs the previous float64 path vs pytorch-ood.

One run, the same features: N pre-projection features (D) projected to the joint space (E) and
matched to C class embeddings, at T = 1 (the paper's) and T = 0.01 (CLIP's logit scale 100).

- ``new``: ``MCMDetector.score_samples`` (``oodprobe.detectors.text.mcm_scores``: float64, the
  first normalisation skipped and the second folded into the in-place softmax).
- ``old``: the previous implementation, copied here (float64: normalise, project, normalise,
  cosines, then ``msp`` on a copy of each block).
- ``pytorch-ood``: its ``MCM.predict_features`` (float32, torch) on the projected features;
  the projection (float32, torch) is timed with it, as it is part of the work.
- ``float32 floor``: the two float32 products alone (torch), what no float32 method beats;
  ``float64 floor``: the two float64 products alone (numpy, in the blocks of the new path, the
  features cast to float64 per block), the same for float64 methods.

Agreement columns compare each with ``old`` (the float64 reference): max relative difference of
the scores and whether the ranking (``argsort``) is identical. Timings are the best of
``--repeats`` runs. The load average is printed and stored: other processes share the cores.

    .venv/bin/python benchmarks/mcm_speed.py            # N=100k, D=768, E=512, C=1000
    .venv/bin/python benchmarks/mcm_speed.py --n 20000  # quicker
    .venv/bin/python benchmarks/mcm_speed.py --threads 1 \
        --json benchmarks/results/mcm_speed_1thread.json   # robust to other processes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

RESULTS = Path(__file__).parent / "results" / "mcm_speed.json"


def best_time(function: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(result, best wall seconds over ``repeats`` runs)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def old_mcm(
    features: npt.NDArray[np.float32],
    embeddings: npt.NDArray[np.float64],
    projection: npt.NDArray[np.float64],
    temperature: float,
) -> npt.NDArray[np.float64]:
    """The previous ``MCMDetector.score_samples`` (text.py before issue 12), verbatim in effect."""
    from oodprobe.arrays import l2_normalize, row_blocks
    from oodprobe.detectors.probe import _CHUNK, msp

    scores = []
    for rows in row_blocks(len(features), _CHUNK):
        joint = l2_normalize(features[rows], dtype=np.float64)
        joint = l2_normalize(joint @ projection)
        scores.append(msp(joint @ embeddings.T, temperature))
    return np.concatenate(scores)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="features scored")
    parser.add_argument("--dims", type=int, default=768, help="pre-projection dims D")
    parser.add_argument("--joint", type=int, default=512, help="joint-space dims E")
    parser.add_argument("--classes", type=int, default=1000, help="class embeddings C")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and BLAS threads (default: theirs)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    if args.threads:  # the same number for torch (pytorch-ood) and numpy's BLAS (ours)
        import threadpoolctl

        torch.set_num_threads(args.threads)
        threadpoolctl.threadpool_limits(args.threads)

    from oodprobe.arrays import l2_normalize
    from oodprobe.detectors.text import MCMDetector

    try:
        import pytorch_ood.detector as peers
    except ImportError:
        peers = None
        print("pytorch-ood is not installed: its column is left out (pip install pytorch-ood)")

    load_before = load_average()
    rng = np.random.default_rng(4)
    features = rng.normal(size=(args.n, args.dims)).astype(np.float32)
    projection = (rng.normal(size=(args.dims, args.joint)) / np.sqrt(args.dims)).astype(np.float32)
    embeddings = l2_normalize(rng.normal(size=(args.classes, args.joint))).astype(np.float32)
    features_t, projection_t = torch.from_numpy(features), torch.from_numpy(projection)
    embeddings_t = torch.from_numpy(embeddings)

    def float32_floor() -> torch.Tensor:
        with torch.no_grad():
            joint = torch.nn.functional.normalize(features_t @ projection_t, dim=1)
            return joint @ embeddings_t.T

    _, floor_seconds = best_time(float32_floor, args.repeats)
    projection64_raw, embeddings64 = projection.astype(np.float64), embeddings.astype(np.float64)
    block_rows = (1 << 21) // args.classes  # the blocks of oodprobe's float64 path

    def float64_floor() -> list[npt.NDArray[np.float64]]:
        # the two float64 products alone per block, results dropped (the float64 paths' floor)
        return [
            (
                (features[start : start + block_rows].astype(np.float64) @ projection64_raw)
                @ embeddings64.T
            )[:, 0]
            for start in range(0, len(features), block_rows)
        ]

    _, floor64_seconds = best_time(float64_floor, args.repeats)
    rows: list[dict[str, Any]] = []
    for temperature in (1.0, 0.01):
        detector = MCMDetector(
            class_embeddings=embeddings, image_projection=projection, temperature=temperature
        ).fit(features[:10])
        unit, projection64, _ = detector._text_arrays()
        assert projection64 is not None
        reference, old_seconds = best_time(
            lambda u=unit, p=projection64, t=temperature: old_mcm(features, u, p, t),
            args.repeats,
        )
        new, new_seconds = best_time(lambda d=detector: d.score_samples(features), args.repeats)
        order = np.argsort(reference, kind="stable")
        row: dict[str, Any] = {
            "temperature": temperature,
            "old_seconds": old_seconds,
            "new_seconds": new_seconds,
            "new_vs_old_speedup": old_seconds / new_seconds,
            "new_max_relative_difference": float(np.max(np.abs(new - reference) / reference)),
            "new_ranking_identical": bool(np.array_equal(np.argsort(new, kind="stable"), order)),
            "float32_floor_seconds": floor_seconds,
            "float64_floor_seconds": floor64_seconds,
        }
        if peers is not None:
            peer = peers.MCM(None, embeddings_t, temperature=temperature)

            def run_peer(peer: Any = peer) -> npt.NDArray[np.float64]:
                with torch.no_grad():
                    projected = torch.nn.functional.normalize(features_t, dim=1) @ projection_t
                    return -np.asarray(peer.predict_features(projected).numpy(), np.float64)

            theirs, peer_seconds = best_time(run_peer, args.repeats)
            row.update(
                {
                    "pytorch_ood_seconds": peer_seconds,
                    "new_vs_pytorch_ood_speedup": peer_seconds / new_seconds,
                    "pytorch_ood_max_relative_difference": float(
                        np.max(np.abs(theirs - reference) / reference)
                    ),
                    "pytorch_ood_ranking_identical": bool(
                        np.array_equal(np.argsort(theirs, kind="stable"), order)
                    ),
                }
            )
        rows.append(row)

    info = {
        "shape": {"n": args.n, "dims": args.dims, "joint": args.joint, "classes": args.classes},
        "repeats (best of)": args.repeats,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    print(
        f"MCM scoring N={args.n} D={args.dims}->E={args.joint} C={args.classes}; "
        f"load average {info['load_average_before']} -> {info['load_average_after']} "
        f"on {info['cores']} cores; torch threads {info['torch_threads']}"
    )
    header = "| T | old s | new s | new/old | max rel diff | same ranking | pytorch-ood s |"
    header += " peer/new | peer rel diff | peer same ranking | f32 floor s | f64 floor s |"
    print(header)
    print("|" + "---|" * 12)
    for row in rows:
        cells = [
            f"{row['temperature']:g}",
            f"{row['old_seconds']:.3f}",
            f"{row['new_seconds']:.3f}",
            f"{row['new_vs_old_speedup']:.2f}x",
            f"{row['new_max_relative_difference']:.1e}",
            str(row["new_ranking_identical"]),
            f"{row.get('pytorch_ood_seconds', float('nan')):.3f}",
            f"{row.get('new_vs_pytorch_ood_speedup', float('nan')):.2f}x",
            f"{row.get('pytorch_ood_max_relative_difference', float('nan')):.1e}",
            str(row.get("pytorch_ood_ranking_identical", "-")),
            f"{row['float32_floor_seconds']:.3f}",
            f"{row['float64_floor_seconds']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
