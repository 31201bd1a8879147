"""Streamed fitting and scoring at scale: time and peak RSS at N = 1 M and 5 M, D = 768.

Synthetic float16 features (``--classes`` Gaussian classes, unequal sizes) are written chunk by
chunk to ``--dir`` (default ``/tmp/scale-stream``) as one raw memory-mappable file of
``--n-max`` rows (5 M × 768 × 2 B = 7.7 GB; the 1 M case is its first 1 M rows), with their
labels and 10k query rows from the same mixture. Every case runs in a fresh subprocess, so its
peak RSS (``ru_maxrss``) is its own; the parent polls each child's RSS and kills it above
``--kill-rss`` (default 10 GiB: the machine is shared), recording the case as killed. Peers
also run under ``RLIMIT_AS`` (``--peer-as``, default 16 GiB), so an allocation failure is
recorded as failed, not a crash.

Cases (``--cases``, default all):

- ``mahalanobis``, ``relative-mahalanobis``, ``gaussian``: oodprobe's fit on the memory-mapped
  float16 array under ``--memory-budget`` (streamed, blocks released), at 1 M and 5 M, then
  scoring of the 10k queries; against the in-memory path at 1 M (the float16 rows copied to
  one float32 array first, 3 GB, then fit: the ``*-memory`` cases) and pytorch-ood 0.2's
  ``Mahalanobis`` / ``RMD`` ``fit_features`` on a float32 tensor of the same rows (its
  covariance is the pooled scatter with a 1e-6 ridge: another estimator, same cost class).
In-memory and peer figures hold the float32 copy, not the file's pages (released after the
copy); the streamed ones hold what their blocks touch (the file's pages are released).

- ``knn``: label-free k-NN (k = 1), 10k queries over the 1 M memory-mapped rows; streamed:
  under the budget the normalised ID set is kept on disk (float32 memmap) and searched in
  ID-row shards; against the in-memory detector on a float32 copy.
- ``linear-probe``: 1 epoch (batch 8192) of the linear probe at 1 M (1 epoch suffices to
  measure memory and time per epoch; the paper trains 100): streamed from the memmap vs on an
  in-memory float32 copy.

Printed as ratios against each figure's reference (streamed / in-memory, 5 M / 1 M, peer /
ours), with the peak RSS in GiB and the 1-minute load average around each case. Writes
``benchmarks/results/scale.json`` (merged with earlier runs of other cases). The data are
deleted at the end unless ``--keep``. Run: ``.venv/bin/python benchmarks/scale.py`` (about
30-40 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "scale.json"
GAUSSIANS = ("mahalanobis", "relative-mahalanobis", "gaussian")
CASES = (*GAUSSIANS, "knn", "linear-probe")
N_QUERIES = 10_000
GIB = float(1 << 30)


# -- the data ---------------------------------------------------------------------------------


def paths(directory: Path) -> dict[str, Path]:
    return {
        "features": directory / "features.f16",
        "labels": directory / "labels.npy",
        "queries": directory / "queries.npy",
        "meta": directory / "meta.json",
    }


def write_data(directory: Path, n_rows: int, dims: int, n_classes: int, seed: int) -> None:
    """Write ``n_rows`` float16 rows chunk by chunk (never more than one chunk in memory)."""
    files = paths(directory)
    meta = {"n_rows": n_rows, "dims": dims, "classes": n_classes, "seed": seed}
    if files["meta"].exists():
        old = json.loads(files["meta"].read_text())
        same = all(old[key] == meta[key] for key in ("dims", "classes", "seed"))
        if same and old["n_rows"] >= n_rows:  # the first n_rows rows of an earlier file
            print(f"data already in {directory}", flush=True)
            return
    need = n_rows * dims * 2 + n_rows * 8
    free = shutil.disk_usage(directory).free
    if free < need + (1 << 30):
        raise SystemExit(f"need {need / 1e9:.1f} GB free in {directory}, have {free / 1e9:.1f}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dims), dtype=np.float32)
    scales = rng.uniform(0.5, 1.5, size=dims).astype(np.float32)
    sizes = rng.uniform(0.5, 1.5, size=n_classes)
    probabilities = sizes / sizes.sum()  # unequal class sizes: the class weights matter
    labels = rng.choice(n_classes, size=n_rows, p=probabilities).astype(np.int64)
    np.save(files["labels"], labels)
    started = time.perf_counter()
    with open(files["features"], "wb") as handle:
        for start in range(0, n_rows, 100_000):
            rows = labels[start : start + 100_000]
            block = rng.standard_normal((len(rows), dims), dtype=np.float32)
            block *= scales
            block += centres[rows]
            handle.write(block.astype(np.float16).tobytes())
    query_labels = rng.choice(n_classes, size=N_QUERIES, p=probabilities)
    queries = rng.standard_normal((N_QUERIES, dims), dtype=np.float32) * scales * 1.2
    queries += centres[query_labels]
    np.save(files["queries"], queries.astype(np.float16))
    files["meta"].write_text(json.dumps(meta))
    print(f"wrote {n_rows} x {dims} float16 in {time.perf_counter() - started:.0f} s", flush=True)


def shrink(directory: Path, n_rows: int) -> None:
    """Truncate the feature file to its first ``n_rows`` rows (the cases left need no more)."""
    files = paths(directory)
    meta = json.loads(files["meta"].read_text())
    if meta["n_rows"] > n_rows:
        os.truncate(files["features"], n_rows * meta["dims"] * 2)
        meta["truncated_from"] = meta.get("truncated_from", meta["n_rows"])
        meta["n_rows"] = n_rows
        files["meta"].write_text(json.dumps(meta))


# -- one case, in a fresh process -------------------------------------------------------------


def worker(case: str, n_rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one case; return its timings and peak RSS (this process's ru_maxrss)."""
    files = paths(Path(args.dir))
    meta = json.loads(files["meta"].read_text())
    mapped = np.memmap(
        files["features"], dtype=np.float16, mode="r", shape=(meta["n_rows"], meta["dims"])
    )[:n_rows]
    labels = np.load(files["labels"])[:n_rows]
    queries = np.load(files["queries"])
    name, _, variant = case.partition(":")
    import torch  # imports first: the baseline is what torch, scipy and sklearn take (~0.7 GB)

    if variant == "pytorch-ood":
        import pytorch_ood.detector  # noqa: F401
    else:
        import oodprobe.detectors  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result: dict[str, Any] = {"case": case, "n": n_rows}
    started = time.perf_counter()
    if variant == "pytorch-ood":
        from pytorch_ood.detector import RMD, Mahalanobis

        from oodprobe.arrays import release_pages

        features = torch.from_numpy(np.asarray(mapped, dtype=np.float32))
        release_pages(mapped)  # as for our in-memory path: the float32 copy, not the file
        result["load_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        peer = (Mahalanobis if name == "mahalanobis" else RMD)(None)
        peer.fit_features(features, torch.from_numpy(labels))
        result["fit_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        peer.predict_features(torch.from_numpy(queries.astype(np.float32)))
        result["score_seconds"] = time.perf_counter() - started
    else:
        from oodprobe.arrays import memory_budget, release_pages
        from oodprobe.detectors import create_detector

        features: Any = mapped
        if variant == "memory":
            features = np.asarray(mapped, dtype=np.float32)
            release_pages(mapped)  # the in-memory path holds the float32 copy, not the file
            result["load_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
        params: dict[str, Any] = {}
        if name == "linear-probe":
            params = {"epochs": 1, "batch_size": 8192, "device": "cpu"}
        detector = create_detector(name, **params)
        budget = args.memory_budget if variant != "memory" else None
        with memory_budget(budget):
            detector.fit(features, labels if detector.requires_labels else None)
            result["fit_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            scores = detector.score_samples(queries)
            result["score_seconds"] = time.perf_counter() - started
        np.save(Path(args.dir) / f"scores-{name}-{variant or 'stream'}-{n_rows}.npy", scores)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["baseline_rss_bytes"] = baseline
    return result


def limit_address_space(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_case(case: str, n_rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``case`` in a subprocess, killing it above ``--kill-rss``; its result or failure."""
    import psutil

    command = [sys.executable, __file__, "--worker", case, "--n", str(n_rows)]
    command += ["--dir", args.dir, "--memory-budget", args.memory_budget]
    peer = case.endswith(":pytorch-ood")
    limit = int(args.peer_as * GIB)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: limit_address_space(limit)) if peer else None,
    )
    watched = psutil.Process(child.pid)
    peak = 0
    killed = False
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        if peak > args.kill_rss * GIB or time.perf_counter() - started > args.timeout:
            child.kill()
            killed = True
            break
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    record: dict[str, Any] = {
        "polled_peak_rss_bytes": peak,
        "case": case,
        "n": n_rows,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    if killed and peak <= args.kill_rss * GIB:
        record["status"] = f"killed (ran past the {args.timeout:g} s timeout)"
        record["peak_rss_bytes"] = peak
    elif killed:
        record["status"] = f"killed (RSS above {args.kill_rss:g} GiB)"
        record["peak_rss_bytes"] = peak
    elif child.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        record["status"] = f"failed (exit {child.returncode}): {last[:200]}"
    else:
        record.update(json.loads(stdout.strip().splitlines()[-1]))
        record["status"] = "ok"
    shown = {key: value for key, value in record.items() if key != "case"}
    print(f"  {case} n={n_rows}: {shown}", flush=True)
    return record


# -- the report ---------------------------------------------------------------------------------


def _find(records: list[dict[str, Any]], case: str, n_rows: int) -> dict[str, Any] | None:
    for record in records:
        if record["case"] == case and record["n"] == n_rows and record["status"] == "ok":
            return record
    return None


def _size_label(n: int) -> str:
    """``1M``, ``5M``, ``200k``: the size a figure was measured at."""
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def ratios(
    records: list[dict[str, Any]], directory: Path, million: int, largest: int
) -> list[dict[str, Any]]:
    """Each figure against its reference, and the score agreement of streamed and in-memory.

    ``million`` is the small size (1 M by default), ``largest`` the large one (5 M).
    """
    lines: list[dict[str, Any]] = []
    small, large = _size_label(million), _size_label(largest)
    for name in (*GAUSSIANS, "knn", "linear-probe"):
        streamed = _find(records, name, million)
        for reference_case, label in (
            (f"{name}:memory", "in-memory"),
            (f"{name}:pytorch-ood", "pytorch-ood"),
        ):
            reference = _find(records, reference_case, million)
            failed = next(
                (r for r in records if r["case"] == reference_case and r["status"] != "ok"), None
            )
            if streamed and reference:
                line = {
                    "figure": f"{name} {small}: streamed vs {label}",
                    "fit_time_ratio": round(reference["fit_seconds"] / streamed["fit_seconds"], 3),
                    "score_time_ratio": round(
                        reference["score_seconds"] / streamed["score_seconds"], 3
                    ),
                    "peak_rss_ratio": round(
                        reference["peak_rss_bytes"] / streamed["peak_rss_bytes"], 3
                    ),
                    "streamed_peak_rss_gib": round(streamed["peak_rss_bytes"] / GIB, 3),
                    f"{label}_peak_rss_gib": round(reference["peak_rss_bytes"] / GIB, 3),
                }
                ours = directory / f"scores-{name}-stream-{million}.npy"
                theirs = directory / f"scores-{name}-memory-{million}.npy"
                if label == "in-memory" and ours.exists() and theirs.exists():
                    a, b = np.load(ours), np.load(theirs)
                    line["max_relative_score_difference"] = float(
                        np.max(np.abs(a - b)) / np.max(np.abs(b))
                    )
                lines.append(line)
            elif streamed and failed:
                lines.append(
                    {
                        "figure": f"{name} {small}: {label}",
                        "status": failed["status"],
                        "streamed_peak_rss_gib": round(streamed["peak_rss_bytes"] / GIB, 3),
                    }
                )
        big = _find(records, name, largest)
        if streamed and big and largest != million:
            lines.append(
                {
                    "figure": f"{name}: {large} vs {small} streamed",
                    "fit_time_ratio": round(big["fit_seconds"] / streamed["fit_seconds"], 3),
                    "peak_rss_ratio": round(big["peak_rss_bytes"] / streamed["peak_rss_bytes"], 3),
                    f"peak_rss_gib_{large.lower()}": round(big["peak_rss_bytes"] / GIB, 3),
                    "under_4_gib": big["peak_rss_bytes"] < 4 * GIB,
                }
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/scale-stream")
    parser.add_argument("--n-max", type=int, default=5_000_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sizes", default="1000000,5000000", help="N of the streamed cases")
    parser.add_argument(
        "--big-cases",
        default=",".join(GAUSSIANS),
        help="Gaussian cases run at every size (the others at the smallest only)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--memory-budget", default="4GiB")
    parser.add_argument("--kill-rss", type=float, default=10.0, help="GiB")
    parser.add_argument("--peer-as", type=float, default=16.0, help="GiB of address space")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args)))
        return
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    if args.write:
        write_data(directory, args.n_max, args.dims, args.classes, args.seed)
        return
    # in a child: a worker forked from a big parent would inherit its ru_maxrss across exec
    writer = [sys.executable, __file__, "--write", "--dir", args.dir, "--n-max", str(args.n_max)]
    writer += ["--dims", str(args.dims), "--classes", str(args.classes), "--seed", str(args.seed)]
    subprocess.run(writer, check=True)
    sizes = [int(size) for size in args.sizes.split(",") if int(size) <= args.n_max]
    one = min(sizes)
    plan: list[tuple[str, int]] = []
    for name in args.cases.split(","):
        if ":" in name:  # one variant alone: mahalanobis:memory, knn:stream (streamed only)
            plan.append((name.removesuffix(":stream"), one))
        elif name in GAUSSIANS:
            big = name in args.big_cases.split(",")
            plan += [(name, size) for size in sorted(sizes) if big or size == one]
            plan.append((f"{name}:memory", one))
            if not args.no_peers and name != "gaussian":
                plan.append((f"{name}:pytorch-ood", one))
        else:  # knn and the probe: 1 M only (the brief's cases)
            plan += [(name, one), (f"{name}:memory", one)]
    output = Path(args.json)
    previous = json.loads(output.read_text()) if output.exists() else {}
    records = [r for r in previous.get("records", []) if (r["case"], r["n"]) not in set(plan)]
    # the large cases first: then the file is cut to its first rows, freeing the disk (the
    # machine's disk is shared; k-NN also writes its normalised ID set there)
    plan.sort(key=lambda item: -item[1])
    for case, size in plan:
        if size == one:
            shrink(directory, one)
        records.append(run_case(case, size, args))
        write_report(output, records, directory, args)
    report = write_report(output, records, directory, args)
    print("\nratios (reference / ours for time and RSS: > 1 means ours is faster / smaller):")
    for line in report["ratios"]:
        print("  " + json.dumps(line))
    print(f"wrote {output}")
    if not args.keep:
        shutil.rmtree(directory)
        print(f"deleted {directory}")


def write_report(
    output: Path, records: list[dict[str, Any]], directory: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Write the JSON (after every case, so an interrupted run keeps what it measured)."""
    report: dict[str, Any] = {
        "benchmark": "scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "data": json.loads(paths(directory)["meta"].read_text()),
        "memory_budget": args.memory_budget,
        "kill_rss_gib": args.kill_rss,
        "records": records,
    }
    sizes = [int(size) for size in args.sizes.split(",")]
    report["ratios"] = ratios(records, directory, min(sizes), max(sizes))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
