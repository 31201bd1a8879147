"""Speed and peak memory of our feature detectors against pytorch-ood, as ratios in one run.

Compared: ``knn`` (k=1, the paper's label-free detector) and ``deep-knn`` (k=50) with
pytorch-ood's ``KNN`` (sklearn ``NearestNeighbors``, exact); ``mahalanobis`` with
``Mahalanobis``; ``relative-mahalanobis`` with ``RMD``. For k-NN, the floor is the time of
the float32 matrix product of the same shape, (queries × D) @ (D × N): as one product when
its output fits in ``--floor-max-gib``, and always as the same product in 1024-query slabs.

Method (honest memory): the features are written to ``.npy`` files first; every
(implementation, detector) pair runs in a fresh subprocess that loads them, then fits and
scores while a thread samples the resident set size (``/proc/self/statm``) every 2 ms. Peak
memory = the highest sample during the step minus the RSS when the step started (the input
features, already loaded, are not counted). Agreement: Spearman rank correlation of our
scores with minus the peer's outlier scores (higher = ID on both sides).

Run: ``.venv/bin/python benchmarks/detectors.py`` (``--quick`` sizes, the default), or e.g.
``--n-train 100000 1000000 --dims 768 --classes 100 1000 --queries 10000``. ``--all`` also runs
``benchmarks/detectors_heads.py``'s ``main()`` when that file exists. Needs ``pytorch-ood``
(the ``bench`` extra) for the peer columns; ``--no-peer`` skips them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS = ("knn", "deep-knn", "mahalanobis", "relative-mahalanobis")
PEERS = {
    "knn": "KNN",
    "deep-knn": "KNN",
    "mahalanobis": "Mahalanobis",
    "relative-mahalanobis": "RMD",
}
OUR_PARAMS: dict[str, dict[str, Any]] = {"knn": {"k": 1}, "deep-knn": {"k": 50}}
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MIB = 1 << 20


# -- measurement (inside the worker) -----------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


@contextmanager
def measured(record: dict[str, float], step: str) -> Iterator[None]:
    """Time a step and record its peak RSS above the RSS at its start (2 ms sampling)."""
    start_rss, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        record[f"{step}_s"] = time.perf_counter() - start
        done.set()
        sampler.join()
        peak[0] = max(peak[0], resident_bytes())
        record[f"{step}_mib"] = max(0, peak[0] - start_rss) / _MIB


def run_ours(method: str, train: Any, labels: Any, queries: Any) -> tuple[Any, dict[str, float]]:
    from oodprobe.detectors import create_detector

    record: dict[str, float] = {}
    detector = create_detector(method, **OUR_PARAMS.get(method, {}))
    with measured(record, "fit"):
        detector.fit(train, labels)
    with measured(record, "score"):
        scores = detector.score_samples(queries)
    return scores, record


def run_peer(method: str, train: Any, labels: Any, queries: Any) -> tuple[Any, dict[str, float]]:
    import torch
    from pytorch_ood import detector as peers

    record: dict[str, float] = {}
    if method in ("knn", "deep-knn"):
        peer = peers.KNN(None, k=OUR_PARAMS[method]["k"])
    else:
        peer = getattr(peers, PEERS[method])(None)
    train_t, labels_t = torch.from_numpy(train), torch.from_numpy(labels)
    with measured(record, "fit"):
        peer.fit_features(train_t, labels_t)
    with measured(record, "score"):
        outlier = peer.predict_features(torch.from_numpy(queries))
    return -outlier.double().numpy(), record


def run_floor(train: Any, queries: Any, max_gib: float) -> tuple[None, dict[str, float]]:
    import torch

    train_t, queries_t = torch.from_numpy(train), torch.from_numpy(queries)
    record: dict[str, float] = {}
    with torch.no_grad():
        if len(queries) * len(train) * 4 <= max_gib * (1 << 30):
            with measured(record, "single"):
                product = torch.mm(queries_t, train_t.T)
            del product
        with measured(record, "slabs"):
            for start in range(0, len(queries), 1024):
                torch.mm(queries_t[start : start + 1024], train_t.T)
    return None, record


def worker(spec: dict[str, Any]) -> None:
    import torch  # imported by every implementation; its import is not part of any step

    torch.set_grad_enabled(False)
    data = Path(spec["data"])
    train = np.load(data / "train.npy")
    labels = np.load(data / "labels.npy")
    queries = np.load(data / "queries.npy")
    runner: Callable[..., tuple[Any, dict[str, float]]]
    if spec["impl"] == "floor":
        scores, record = run_floor(train, queries, spec["floor_max_gib"])
    else:
        runner = run_ours if spec["impl"] == "ours" else run_peer
        scores, record = runner(spec["method"], train, labels, queries)
    if scores is not None:
        np.save(data / f"scores-{spec['impl']}-{spec['method']}.npy", scores)
    print("RESULT " + json.dumps(record))


# -- the parent: data, subprocesses, the table -------------------------------------------------


def write_data(
    directory: Path, n_train: int, dims: int, classes: int, n_queries: int, seed: int = 0
) -> None:
    """Anisotropic Gaussian classes (spectrum k^-0.5, a common offset), written in row blocks.

    Queries: half from the ID classes, half from unseen classes (near-OOD).
    """
    fixed = np.random.default_rng(1234)
    means = fixed.normal(scale=0.3, size=(2 * classes, dims)).astype(np.float32)
    basis = np.linalg.qr(fixed.normal(size=(dims, dims)))[0]
    mixing = (basis * np.arange(1, dims + 1) ** -0.5).astype(np.float32)
    offset = fixed.normal(scale=0.2, size=dims).astype(np.float32)
    rng = np.random.default_rng(seed)

    def rows(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        latent = rng.standard_normal((len(labels), dims), dtype=np.float32) + means[labels]
        return np.asarray(latent @ mixing + offset, dtype=np.float32)

    labels = np.arange(n_train) % classes
    rng.shuffle(labels)
    train = np.lib.format.open_memmap(directory / "train.npy", "w+", np.float32, (n_train, dims))
    for start in range(0, n_train, 65536):
        train[start : start + 65536] = rows(labels[start : start + 65536])
    train.flush()
    del train
    np.save(directory / "labels.npy", labels.astype(np.int64))
    query_labels = np.r_[rng.integers(0, classes, n_queries // 2)]
    query_labels = np.r_[query_labels, rng.integers(classes, 2 * classes, n_queries // 2)]
    np.save(directory / "queries.npy", rows(query_labels))


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    return f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"


def spearman(directory: Path, method: str) -> float:
    from scipy.stats import spearmanr

    ours = np.load(directory / f"scores-ours-{method}.npy")
    peer = np.load(directory / f"scores-peer-{method}.npy")
    return float(spearmanr(ours, peer).statistic)


def bench_size(args: argparse.Namespace, n_train: int, classes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="oodprobe-bench-", dir=args.tmp) as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        write_data(directory, n_train, args.dims, classes, args.queries)
        print(
            f"\n## N_train={n_train:,} D={args.dims} C={classes} queries={args.queries:,} "
            f"(data written in {time.perf_counter() - start:.1f} s)"
        )
        base = {"data": str(directory), "floor_max_gib": args.floor_max_gib}
        floor = spawn({**base, "impl": "floor", "method": ""}, args.timeout)
        if isinstance(floor, dict):
            single = f"{floor['single_s']:.2f} s single product, " if "single_s" in floor else ""
            print(f"matmul floor: {single}{floor['slabs_s']:.2f} s in 1024-query slabs")
        header = "| detector | impl | fit s | score s | fit MiB | score MiB | ratio | Spearman |"
        print(header + "\n" + "|---" * 8 + "|")
        for method in args.methods:
            ours = spawn({**base, "impl": "ours", "method": method}, args.timeout)
            peer = (
                spawn({**base, "impl": "peer", "method": method}, args.timeout)
                if args.peer
                else "skipped"
            )
            print_rows(method, ours, peer, floor, directory)


def print_rows(
    method: str,
    ours: dict[str, float] | str,
    peer: dict[str, float] | str,
    floor: dict[str, float] | str,
    directory: Path,
) -> None:
    def cells(result: dict[str, float] | str) -> str:
        if isinstance(result, str):
            return f"{result} | | | "
        return (
            f"{result['fit_s']:.2f} | {result['score_s']:.2f} | "
            f"{result['fit_mib']:.0f} | {result['score_mib']:.0f}"
        )

    ratio, agreement = "", ""
    if isinstance(ours, dict) and isinstance(peer, dict):
        total = ours["fit_s"] + ours["score_s"]
        ratio = f"peer/ours {(peer['fit_s'] + peer['score_s']) / total:.1f}x"
        agreement = f"{spearman(directory, method):.6f}"
    if isinstance(ours, dict) and isinstance(floor, dict) and method in ("knn", "deep-knn"):
        reference = floor.get("single_s", floor["slabs_s"])
        ratio += f"; score/floor {ours['score_s'] / reference:.2f}x"
    print(f"| {method} | oodprobe | {cells(ours)} | {ratio} | {agreement} |")
    print(f"| {method} | pytorch-ood {PEERS[method]} | {cells(peer)} | | |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (the default)")
    parser.add_argument("--n-train", type=int, nargs="+", help="training sizes (quick: 20000)")
    parser.add_argument("--dims", type=int, default=None, help="feature dims (quick: 256)")
    parser.add_argument("--classes", type=int, nargs="+", help="class counts (quick: 100)")
    parser.add_argument("--queries", type=int, default=None, help="queries (quick: 2000)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip pytorch-ood")
    parser.add_argument("--floor-max-gib", type=float, default=4.0, help="single-product cap")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--tmp", default=None, help="directory for the feature files")
    parser.add_argument("--all", action="store_true", help="also run detectors_heads.py")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    full = args.n_train or args.dims or args.classes or args.queries
    quick = args.quick or not full
    args.n_train = args.n_train or [20_000 if quick else 100_000]
    args.dims = args.dims or (256 if quick else 768)
    args.classes = args.classes or [100]
    args.queries = args.queries or (2000 if quick else 10_000)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}")
    for n_train in args.n_train:
        for classes in args.classes:
            bench_size(args, n_train, classes)
    heads = Path(__file__).with_name("detectors_heads.py")
    if args.all and heads.exists():
        spec = importlib.util.spec_from_file_location("detectors_heads", heads)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("\n# detectors_heads.py")
        module.main(["--all"])


if __name__ == "__main__":
    main()
