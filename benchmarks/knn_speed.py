"""Exact k-NN search: ours (fp32 and bf16 candidate products) against faiss and a BLAS floor.

One run, identical inputs: ``n_train`` × ``dims`` L2-normalised ID features, ``n_queries``
queries, top-``k`` by cosine similarity. Timed (search only; the index/preparation time is
reported separately):

- ``faiss``: ``faiss.IndexFlatIP`` (what a user would pick instead), ``search``;
- ``numpy floor``: a blocked numpy float32 product + max (numpy's OpenBLAS), the plain floor;
- ``torch floor``: the same with torch's float32 product + amax (MKL), the floor of our product;
- ``ours fp32`` / ``ours bf16``: ``oodprobe.detectors.search.exact_search`` at each precision
  (provably the float64 top-k: candidates, exact re-ranking, full-row fallback);
- ``ours auto``: the precision ``auto`` resolves to on this machine.

Printed as ratios in the same run (time of the reference / time of ours: > 1 means ours is
faster), with max |score difference| and neighbour agreement against our exact result, the
Spearman correlation of the top-1 scores, the number of queries that took the fallback, and a
float64 brute-force check of ours on ``--check-queries`` queries. The 1-minute load average is
recorded before and after each timing (other processes on the machine skew every figure).

Data (``--data``): ``clustered`` (default: 1000 Gaussian clusters on the sphere, within-cluster
cosine ~0.5, queries from the same mixture, like ID features of a real encoder) or
``gaussian`` (isotropic). Run: ``.venv/bin/python benchmarks/knn_speed.py`` (``--n-train``,
``--n-queries``, ``--dims``, ``--k``, ``--skip-faiss``, ``--json PATH``, default
``benchmarks/results/knn_speed.json``). Takes ~3 minutes on 2 CPU cores at the default shapes,
most of it faiss. Needs ``faiss-cpu`` (the ``faiss`` extra) unless ``--skip-faiss``.
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
import torch
from scipy.stats import spearmanr

from oodprobe.detectors import search

RESULTS = Path(__file__).parent / "results" / "knn_speed.json"


def make_data(
    kind: str, n_train: int, n_queries: int, dims: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(train, queries), float32, unit rows."""
    rng = np.random.default_rng(seed)

    def unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    if kind == "gaussian":
        return (
            unit(rng.standard_normal((n_train, dims), dtype=np.float32)),
            unit(rng.standard_normal((n_queries, dims), dtype=np.float32)),
        )
    centres = unit(rng.standard_normal((1000, dims), dtype=np.float32))

    def sample(n: int) -> npt.NDArray[np.float32]:
        rows = rng.standard_normal((n, dims), dtype=np.float32) / np.float32(np.sqrt(dims))
        rows += centres[rng.integers(0, len(centres), n)]
        return unit(rows)

    return sample(n_train), sample(n_queries)


def load() -> float:
    return os.getloadavg()[0]


def run_timed(
    methods: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each method ``repeats`` times, round-robin (a load change hits all alike); min time."""
    timings: dict[str, Any] = {name: {"runs": [], "load_1min": []} for name in methods}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, method in methods.items():
            before = load()
            start = time.perf_counter()
            results[name] = method()
            seconds = time.perf_counter() - start
            timings[name]["runs"].append(round(seconds, 3))
            timings[name]["load_1min"].append([round(before, 2), round(load(), 2)])
            print(
                f"  {name:<12} {seconds:8.2f} s   (load {before:.2f} -> {load():.2f})", flush=True
            )
    for entry in timings.values():
        entry["seconds"] = min(entry["runs"])
    return timings, results


def blocked_floor(
    train: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], library: str
) -> npt.NDArray[np.float32]:
    """Max similarity per query: a float32 product in (1024 × 16384) blocks and a max."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    if library == "torch":
        train_t, queries_t = torch.from_numpy(train), torch.from_numpy(queries)
    for q in range(0, len(queries), 1024):
        for t in range(0, len(train), 16384):
            if library == "numpy":
                block_max = (queries[q : q + 1024] @ train[t : t + 16384].T).max(axis=1)
            else:
                product = torch.mm(queries_t[q : q + 1024], train_t[t : t + 16384].T)
                block_max = product.amax(dim=1).numpy()
            np.maximum(best[q : q + 1024], block_max, out=best[q : q + 1024])
    return best


def product_only(
    train: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], dtype: str
) -> None:
    """torch's (queries × D) · (D × train) product alone, in (· × 16384) blocks: the GEMM rate."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    left = torch.from_numpy(queries).to(torch_dtype)
    right = torch.from_numpy(train).to(torch_dtype)
    out = torch.empty(len(left), 16384, dtype=torch_dtype)
    for t in range(0, len(right), 16384):
        block = right[t : t + 16384]
        torch.mm(left, block.T, out=out[:, : len(block)])


def brute_force(
    train: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Float64 top-k of every row (search.exact_scores' formula), ties to the smaller index."""
    values = np.empty((len(queries), k))
    indices = np.empty((len(queries), k), dtype=np.int64)
    rows = np.arange(len(train), dtype=np.int64)
    for i, query in enumerate(queries.astype(np.float64)):
        scores = search.exact_scores(train, query[None], np.zeros_like(rows), rows)
        order = np.lexsort((rows, -scores))[:k]
        values[i], indices[i] = scores[order], order
    return values, indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--data", choices=("clustered", "gaussian"), default="clustered")
    parser.add_argument("--check-queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    print(
        f"{args.n_train} x {args.dims} train, {args.n_queries} queries, k={args.k}, "
        f"{args.data} data; {cpu}, torch threads {torch.get_num_threads()}, load {load():.2f}"
    )
    train, queries = make_data(args.data, args.n_train, args.n_queries, args.dims, args.seed)
    auto = search.resolve_precision("auto")
    print(f"precision 'auto' resolves to {auto!r} here")

    fallbacks: dict[str, int] = {"fp32": 0, "bf16": 0}
    full_rows = search._full_rows

    def counting_full_rows(
        index: search.ExactIndex, rows: npt.NDArray[np.float64], k: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        fallbacks[index.precision] = fallbacks.get(index.precision, 0) + len(rows)
        return full_rows(index, rows, k)

    search._full_rows = counting_full_rows  # type: ignore[assignment]

    preparations: dict[str, Callable[[], Any]] = {
        f"prepare {precision}": lambda p=precision: search.prepare_exact(train, p)
        for precision in ("fp32", "bf16")
    }
    if not args.skip_faiss:
        import faiss

        preparations["faiss add"] = lambda: _flat_index(faiss, train)
    prepare_timings, prepared = run_timed(preparations, 1)
    methods: dict[str, Callable[[], Any]] = {
        f"ours {precision}": lambda i=prepared[f"prepare {precision}"]: search.exact_search(
            train, queries, args.k, index=i
        )
        for precision in ("fp32", "bf16")
    }
    product_rows = min(4096, len(queries))
    for dtype in ("fp32", "bf16"):
        methods[f"product {dtype}"] = lambda d=dtype: product_only(train, queries[:product_rows], d)
    methods["numpy floor"] = lambda: (blocked_floor(train, queries, "numpy"), None)
    methods["torch floor"] = lambda: (blocked_floor(train, queries, "torch"), None)
    if not args.skip_faiss:
        methods["faiss"] = lambda flat=prepared["faiss add"]: flat.search(queries, args.k)
    timings, results = run_timed(methods, args.repeats)
    timings.update(prepare_timings)
    fallbacks = {name: count // args.repeats for name, count in fallbacks.items()}
    del prepared, methods

    product_gflop = 2 * product_rows * args.n_train * args.dims / 1e9
    rates = {
        f"product {dtype} GFLOP/s": round(product_gflop / timings[f"product {dtype}"]["seconds"], 1)
        for dtype in ("fp32", "bf16")
    }
    print(f"  {product_rows} x {args.dims} @ {args.dims} x {args.n_train} product rates: {rates}")
    exact_values, exact_indices = results["ours fp32"]
    agreement: dict[str, Any] = {}
    for name, result in results.items():
        if name.startswith("product "):
            continue
        values, indices = result
        top1 = np.asarray(values[:, 0] if values.ndim == 2 else values, dtype=np.float64)
        entry: dict[str, Any] = {
            "max |top-1 score diff| vs exact": float(np.abs(top1 - exact_values[:, 0]).max()),
            "spearman top-1 vs exact": float(spearmanr(top1, exact_values[:, 0]).statistic),
        }
        if indices is not None:
            entry["neighbours identical (fraction of queries)"] = float(
                np.mean(np.all(indices == exact_indices, axis=1))
            )
            entry["max |score diff| vs exact"] = float(np.abs(values - exact_values).max())
        agreement[name] = entry

    check = min(args.check_queries, len(queries))
    reference = brute_force(train, queries[:check], args.k)
    brute = {
        name: {
            "neighbours identical": bool(np.array_equal(results[name][1][:check], reference[1])),
            "max |score diff|": float(np.abs(results[name][0][:check] - reference[0]).max()),
        }
        for name in ("ours fp32", "ours bf16")
    }

    def ratio(reference_name: str, ours: str) -> float | None:
        if reference_name not in timings:
            return None
        return round(timings[reference_name]["seconds"] / timings[ours]["seconds"], 3)

    ratios = {
        "faiss / ours bf16": ratio("faiss", "ours bf16"),
        "faiss / ours fp32": ratio("faiss", "ours fp32"),
        "numpy floor / ours bf16": ratio("numpy floor", "ours bf16"),
        "numpy floor / ours fp32": ratio("numpy floor", "ours fp32"),
        "torch floor / ours fp32": ratio("torch floor", "ours fp32"),
        "ours fp32 / ours bf16": ratio("ours fp32", "ours bf16"),
        "product fp32 / product bf16": ratio("product fp32", "product bf16"),
        f"faiss / ours auto ({auto})": ratio("faiss", f"ours {auto}"),
    }
    print("\nratios (reference time / our time; > 1: ours faster):")
    for name, value in ratios.items():
        print(f"  {name:<28} {value}")
    print("\nagreement with the exact result (ours fp32):")
    for name, entry in agreement.items():
        print(f"  {name:<12} " + ", ".join(f"{key}: {value:.3g}" for key, value in entry.items()))
    print(f"\nfloat64 brute force on {check} queries: {brute}")
    print(f"queries that took the full-row fallback: {fallbacks}")

    gflops = 2 * args.n_train * args.n_queries * args.dims / 1e9
    report = {
        "info": {
            "shape": {
                "n_train": args.n_train,
                "n_queries": args.n_queries,
                "dims": args.dims,
                "k": args.k,
                "data": args.data,
                "seed": args.seed,
            },
            "product_gflop": round(gflops, 1),
            "cpu": cpu,
            "torch_threads": torch.get_num_threads(),
            "auto_precision": auto,
            "bf16_product_faster_here": search.bf16_is_faster(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": _versions(args.skip_faiss),
        },
        "product_rates": rates,
        "seconds": timings,
        "ratios": ratios,
        "agreement_with_exact": agreement,
        "float64_brute_force_check": {"queries": check, **brute},
        "fallback_queries": fallbacks,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


def _flat_index(faiss: Any, train: npt.NDArray[np.float32]) -> Any:
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return index


def _versions(skip_faiss: bool) -> dict[str, str]:
    from importlib.metadata import version

    names = ["oodprobe", "torch", "numpy"] + ([] if skip_faiss else ["faiss-cpu"])
    return {name: version(name) for name in names}


if __name__ == "__main__":
    main()
