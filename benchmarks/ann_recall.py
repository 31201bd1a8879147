"""Approximate k-NN (faiss IVF / HNSW) against oodprobe's exact search: recall, speed, AUROC.

What a user of ``KNNDetector(backend="faiss-ivf" | "faiss-hnsw")`` gives up and gains, at
N = 100k and 1M ID training rows × D = 768 (synthetic) and on real EfficientNet-Lite0 features of
the offline-default preset (N = 3000, D = 1280). For each index configuration (IVF: ``n_lists``
× ``n_probe``; HNSW: ``hnsw_m`` × ``ef_search``) it records

- build seconds (k-means + add for IVF, graph construction for HNSW) and query seconds for all
  queries (ID test + OOD), and the speedup of the query against the exact search;
- recall@1 and recall@10: the share of the exact top-k (oodprobe's exact backend, provably the
  float64 top-k) that the approximate search returns (|approximate ∩ exact| / k, per query,
  averaged);
- the AUROC (ID test vs OOD, ``oodprobe.metrics.auroc``) of the k-NN score computed from the
  approximate neighbours (``knn`` with k = 1, the paper's max cosine, and k = 10, mean
  exp(cos/0.02)), and its difference from the exact AUROC in percentage points.

How it is measured, and why:

- The exact ground truth (top-10 of every query, ``search.exact_search``, the exact backend of
  ``KNNDetector``) is computed once per data set and cached under ``--workdir``; its time is
  the exact reference.
- Each index configuration runs in its own subprocess, time-boxed (``--build-box`` seconds for
  the build, ``--search-box`` for its searches, smallest setting first): what does not finish
  is recorded as skipped with the time it had, not waited for. Neighbours are found by
  ``search.faiss_search`` (what the detector calls) on an index built exactly as
  ``search.build_faiss_index`` builds it, but not serialised: the serialised copy and faiss's
  intermediate buffer would triple the index's memory (9 GB at 1M × 768) and break this
  benchmark's 8 GB budget. Scores are the detector's formula on those neighbours (float64
  cosines, as ``KNNDetector._score_from_neighbors``).
- At the smaller sizes (``--detector-max-n``), one setting per index family also runs through
  ``KNNDetector(backend=...)`` itself (fit + ``score_samples``, k = 1 and k = 10), and the JSON
  records the largest difference from the scores computed here, the detector's times and its
  peak RSS (which shows the memory the detector needs for an index), and the exact backend.
- Synthetic data: ``--clusters`` Gaussian clusters whose centres lie in a random
  ``--intrinsic-dims``-dimensional subspace, with spread ``--spread`` inside it and isotropic
  noise ``--noise`` in all D dimensions, L2-normalised: ID training and ID test rows from the
  same mixture, OOD rows from ``--ood-clusters`` other centres of the same subspace. The
  defaults put the exact k-NN AUROC near 0.85 (not 1.0), so AUROC changes are visible and
  neighbours are not trivial. The smaller N is a prefix of the larger training set (an i.i.d.
  sample of the same mixture), so one 3 GB file serves both.
- faiss and torch threads and the 1-minute load average (before and after each timing) are
  recorded: on a shared machine every figure is only as good as the load it ran under.

Run: ``.venv/bin/python benchmarks/ann_recall.py`` (``--sizes 100000,1000000``, ``--n-queries``,
``--skip-real``, ``--json``, default ``benchmarks/results/ann_recall.json``; ``--cleanup`` deletes
``--workdir`` at the end). Peak memory ~4 GB at 1M (the data are memory-mapped from disk, the
index holds one copy); disk: 3.1 GB under ``--workdir`` at 1M. Needs ``faiss-cpu``.
"""

from __future__ import annotations

import argparse
import json
import math
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
import numpy.typing as npt

from oodprobe.arrays import l2_normalize
from oodprobe.detectors import search
from oodprobe.metrics import auroc

RESULTS = Path(__file__).parent / "results" / "ann_recall.json"
K_MAX = 10  # neighbours searched; recall@1 and the k = 1 score use the first
TEMPERATURE = 0.02  # KNNDetector's default, for the k = 10 score
CHUNK_ROWS = 50_000  # rows generated (and their seed) per chunk, so a prefix is reproducible


def load() -> float:
    return round(os.getloadavg()[0], 2)


def memory_status() -> dict[str, float]:
    """Peak and current resident memory of this process (GiB), from /proc/self/status."""
    values: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = round(int(rest.split()[0]) / 2**20, 2)
    except OSError:  # not Linux: the maximum resident set size only
        values["VmHWM"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return values


# -- data ----------------------------------------------------------------------------------------


def synthetic_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dims": args.dims,
        "intrinsic_dims": args.intrinsic_dims,
        "clusters": args.clusters,
        "ood_clusters": args.ood_clusters,
        "spread": args.spread,
        "noise": args.noise,
        "n_id_queries": args.n_queries // 2,
        "n_ood_queries": args.n_queries - args.n_queries // 2,
        "seed": args.seed,
    }


def _mixture_rows(
    centres: npt.NDArray[np.float32],
    basis: npt.NDArray[np.float32],
    n_rows: int,
    params: dict[str, Any],
    seed: list[int],
) -> npt.NDArray[np.float32]:
    """``n_rows`` unit rows: a random centre + spread in the subspace + isotropic noise."""
    rng = np.random.default_rng(seed)
    intrinsic, dims = basis.shape
    latent = centres[rng.integers(0, len(centres), n_rows)]
    latent += np.float32(params["spread"] / math.sqrt(intrinsic)) * rng.standard_normal(
        (n_rows, intrinsic), dtype=np.float32
    )
    rows = latent @ basis
    rows += np.float32(params["noise"] / math.sqrt(dims)) * rng.standard_normal(
        (n_rows, dims), dtype=np.float32
    )
    return np.asarray(l2_normalize(rows, dtype=np.float32), dtype=np.float32)


def write_synthetic(workdir: Path, n_train: int, params: dict[str, Any]) -> dict[str, Any]:
    """Write (or reuse) ``train.f32`` (n_train, D) and ``queries.f32`` (ID then OOD rows)."""
    meta_path = workdir / "synthetic.json"
    wanted = {**params, "n_train": n_train}
    if meta_path.exists() and json.loads(meta_path.read_text()) == wanted:
        return wanted
    rng = np.random.default_rng(params["seed"])
    dims, intrinsic = params["dims"], params["intrinsic_dims"]
    basis = np.linalg.qr(rng.standard_normal((dims, intrinsic)))[0].T.astype(np.float32)

    def unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    centres = unit(rng.standard_normal((params["clusters"], intrinsic)))
    ood_centres = unit(rng.standard_normal((params["ood_clusters"], intrinsic)))
    seed = params["seed"]
    started = time.perf_counter()
    train = np.lib.format.open_memmap(
        workdir / "train.npy", mode="w+", dtype=np.float32, shape=(n_train, dims)
    )
    for chunk, start in enumerate(range(0, n_train, CHUNK_ROWS)):
        stop = min(n_train, start + CHUNK_ROWS)
        train[start:stop] = _mixture_rows(centres, basis, stop - start, params, [seed, 1, chunk])
    train.flush()
    del train
    queries = np.concatenate(
        [
            _mixture_rows(centres, basis, params["n_id_queries"], params, [seed, 2]),
            _mixture_rows(ood_centres, basis, params["n_ood_queries"], params, [seed, 3]),
        ]
    )
    np.save(workdir / "queries.npy", queries)
    meta_path.write_text(json.dumps(wanted))
    print(f"wrote {n_train} x {dims} synthetic rows in {time.perf_counter() - started:.0f} s")
    return wanted


def write_real(workdir: Path) -> dict[str, Any]:
    """EfficientNet-Lite0 features of the offline-default preset (oodprobe's API and cache).

    Train: the preset's ID training set; queries: its ID test set, then its near-OOD set
    (Fashion-MNIST 5-9) and far-OOD sets, in that order. Returns counts per part.
    """
    from oodprobe.benchmark import create_id_sets
    from oodprobe.benchmark_spec import create_benchmark
    from oodprobe.features import extract_features

    spec = create_benchmark("offline-default")
    encoder = spec.encoders[0]
    id_train, id_test = create_id_sets(spec, download=False)

    def features(dataset: Any) -> npt.NDArray[np.float32]:
        feature_set = extract_features(dataset, encoder, progress=False)
        return np.asarray(l2_normalize(feature_set.features, dtype=np.float32))

    train = features(id_train)
    parts = {"id_test": features(id_test)}
    for data in spec.ood:
        parts[f"{data.group}:{data.label}"] = features(data.create(False))
    np.save(workdir / "train-real.npy", train)
    np.save(workdir / "queries-real.npy", np.concatenate(list(parts.values())))
    return {
        "preset": spec.name,
        "encoder": encoder,
        "n_train": len(train),
        "dims": int(train.shape[1]),
        "parts": {name: len(rows) for name, rows in parts.items()},
    }


# -- exact ground truth ----------------------------------------------------------------------


def exact_truth(
    workdir: Path, tag: str, train: npt.NDArray[np.float32], queries: npt.NDArray[np.float64]
) -> dict[str, Any]:
    """Exact top-K_MAX (oodprobe's exact search), cached as ``exact-<tag>.npz``."""
    path = workdir / f"exact-{tag}.npz"
    if path.exists():
        cached = np.load(path)
        return {
            "similarities": cached["similarities"],
            "indices": cached["indices"],
            "info": json.loads(str(cached["info"])),
        }
    before = load()
    started = time.perf_counter()
    index = search.prepare_exact(train, "auto")
    prepared = time.perf_counter()
    similarities, indices = search.exact_search(train, queries, K_MAX, index=index)
    finished = time.perf_counter()
    info = {
        "prepare_s": round(prepared - started, 2),
        "query_s": round(finished - prepared, 2),
        "precision": index.precision,
        "load_1min": [before, load()],
    }
    print(f"  exact top-{K_MAX}: {info['query_s']} s (load {before} -> {load()})", flush=True)
    np.savez(path, similarities=similarities, indices=indices, info=json.dumps(info))
    return {"similarities": similarities, "indices": indices, "info": info}


# -- scores and recall -------------------------------------------------------------------------


def knn_scores(
    train: npt.NDArray[np.float32], queries: npt.NDArray[np.float64], indices: npt.NDArray[np.int64]
) -> dict[int, npt.NDArray[np.float64]]:
    """k = 1 and k = K_MAX scores of KNNDetector from given neighbours (its formula, float64)."""
    scores = {1: np.empty(len(queries)), K_MAX: np.empty(len(queries))}
    for start in range(0, len(queries), 1000):
        rows = slice(start, start + 1000)
        neighbours = train[indices[rows]].astype(np.float64)  # (n, k, D)
        cosines = np.einsum("nkd,nd->nk", neighbours, queries[rows])
        scores[1][rows] = cosines[:, 0]
        scores[K_MAX][rows] = np.exp(cosines[:, :K_MAX] / TEMPERATURE).mean(axis=1)
    return scores


def aurocs(scores: dict[int, npt.NDArray[np.float64]], n_id: int) -> dict[int, float]:
    return {k: auroc(values[:n_id], values[n_id:]) for k, values in scores.items()}


def group_aurocs(
    scores: npt.NDArray[np.float64], n_id: int, groups: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """AUROC of the ID rows against each OOD set (its (start, stop) rows among the queries)."""
    return {
        name: auroc(scores[:n_id], scores[start:stop]) for name, (start, stop) in groups.items()
    }


# -- one index configuration, in a subprocess ---------------------------------------------------


def build_index(train: npt.NDArray[np.float32], backend: str, n_lists: int, hnsw_m: int) -> Any:
    """The index ``search.build_faiss_index`` builds, kept live instead of serialised."""
    import faiss

    dims = train.shape[1]
    index: Any
    if backend == "faiss-ivf":
        quantizer = faiss.IndexFlatIP(dims)
        index = faiss.IndexIVFFlat(quantizer, dims, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
    else:
        index = faiss.IndexHNSWFlat(dims, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(train)  # faiss's Python wrapper keeps the quantizer alive with the index
    return index


def worker(spec: dict[str, Any]) -> None:
    """Build one index and search with each setting; progress written to ``spec['out']``."""
    import faiss

    from oodprobe.errors import InvalidParameterError

    out = Path(spec["out"])
    train = np.load(spec["train"], mmap_mode="r")[: spec["n_train"]]
    queries = np.asarray(np.load(spec["queries"]), dtype=np.float32)
    record: dict[str, Any] = {"faiss_threads": faiss.omp_get_max_threads(), "settings": {}}

    def save() -> None:
        out.with_suffix(".tmp").write_text(json.dumps(record))
        out.with_suffix(".tmp").replace(out)

    if spec["mode"] == "detector":
        detector_run(spec, train, queries, record, save)
        return
    before = load()
    started = time.perf_counter()
    index = build_index(train, spec["backend"], spec.get("n_lists", 1), spec.get("hnsw_m", 32))
    record["build_s"] = round(time.perf_counter() - started, 2)
    record["build_load_1min"] = [before, load()]
    record["memory_after_build_gib"] = memory_status()
    save()
    for value in spec["values"]:
        key = "n_probe" if spec["backend"] == "faiss-ivf" else "ef_search"
        params = {"n_probe": 1, "ef_search": 1, key: value}
        before = load()
        started = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            _, indices = search.faiss_search(
                index, train, queries, K_MAX, backend=spec["backend"], **params
            )
        except InvalidParameterError as error:  # fewer than K_MAX found: k = 1 still works
            entry["error_k10"] = str(error)
            _, indices = search.faiss_search(
                index, train, queries, 1, backend=spec["backend"], **params
            )
        entry["query_s"] = round(time.perf_counter() - started, 3)
        entry["load_1min"] = [before, load()]
        np.save(out.parent / f"{out.stem}-{value}.npy", indices)
        record["settings"][str(value)] = entry
        save()


def detector_run(
    spec: dict[str, Any],
    train: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    record: dict[str, Any],
    save: Any,
) -> None:
    """KNNDetector itself: fit (timed, peak memory) and score_samples at k = K_MAX and 1."""
    from oodprobe.detectors.neighbors import KNNDetector

    params = {
        key: spec[key] for key in ("n_lists", "n_probe", "hnsw_m", "ef_search") if key in spec
    }
    detector = KNNDetector(k=K_MAX, backend=spec["backend"], **params)
    before = load()
    started = time.perf_counter()
    detector.fit(train)
    record["fit_s"] = round(time.perf_counter() - started, 2)
    record["fit_load_1min"] = [before, load()]
    record["memory_after_fit_gib"] = memory_status()
    for k in (K_MAX, 1):
        detector.set_params(k=k)
        started = time.perf_counter()
        scores = detector.score_samples(queries)
        record[f"score_s_k{k}"] = round(time.perf_counter() - started, 2)
        np.save(Path(spec["out"]).parent / f"{Path(spec['out']).stem}-k{k}.npy", scores)
    record["memory_end_gib"] = memory_status()
    save()


def run_worker(
    spec: dict[str, Any],
    build_box: float,
    search_box: float,
    reuse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``worker(spec)`` in a subprocess; kill it past the time boxes; return its record.

    ``reuse`` (``--reuse``): the earlier run's summary; if its worker output is still in the
    work folder, return that (with the earlier status) instead of running again.
    """
    out = Path(spec["out"])
    final = out.with_suffix(".final.json")
    if reuse is not None and out.exists():
        if final.exists():
            return dict(json.loads(final.read_text()))
        record = json.loads(out.read_text())
        record.update({key: reuse[key] for key in ("status", "wall_s") if key in reuse})
        record.setdefault("status", "unknown: reused without an earlier status")
        return dict(record)
    out.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)])
    started = time.monotonic()
    status = "finished"
    while process.poll() is None:
        time.sleep(0.5)
        elapsed = time.monotonic() - started
        built = out.exists()
        if (not built and elapsed > build_box) or elapsed > build_box + search_box:
            process.kill()
            process.wait()
            status = "killed: build exceeded" if not built else "killed: searches exceeded"
            status += f" the time box ({elapsed:.0f} s)"
            break
    record = json.loads(out.read_text()) if out.exists() else {}
    if status == "finished" and process.returncode != 0:
        status = f"failed with exit code {process.returncode}"
    record["status"] = status
    record["wall_s"] = round(time.monotonic() - started, 1)
    final.write_text(json.dumps(record))
    return record


# -- one data set -------------------------------------------------------------------------------


def run_dataset(
    args: argparse.Namespace,
    tag: str,
    train_path: Path,
    queries_path: Path,
    n_train: int,
    n_id: int,
    configs: list[dict[str, Any]],
    results: dict[str, Any],
    groups: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Exact ground truth, every index configuration and the detector check of one data set.

    ``groups``: the query rows of each OOD set, for an AUROC per set (k = 1) beside the pooled.
    """
    workdir = Path(args.workdir)
    train = np.load(train_path, mmap_mode="r")[:n_train]
    queries: npt.NDArray[np.float64] = np.asarray(
        l2_normalize(np.load(queries_path), dtype=np.float64), dtype=np.float64
    )
    print(f"\n== {tag}: N = {n_train}, D = {train.shape[1]}, {len(queries)} queries", flush=True)
    truth = exact_truth(workdir, tag, train, queries)
    exact_scores = knn_scores(train, queries, truth["indices"])
    exact_auroc = aurocs(exact_scores, n_id)
    entry: dict[str, Any] = results.setdefault(tag, {})
    entry.update(
        {
            "n_train": n_train,
            "dims": int(train.shape[1]),
            "n_id_queries": n_id,
            "n_ood_queries": len(queries) - n_id,
            "exact": {**truth["info"], "auroc_k1": exact_auroc[1], "auroc_k10": exact_auroc[10]},
            "configs": entry.get("configs", []),
            "build_box_s": args.build_box,
            "search_box_s": args.search_box,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_1min_start": load(),
        }
    )
    if groups:
        entry["exact"]["auroc_k1_by_ood_set"] = group_aurocs(exact_scores[1], n_id, groups)
    exact_query_s = truth["info"]["query_s"]
    base = {
        "train": str(train_path),
        "queries": str(workdir / f"queries-unit-{tag}.npy"),
        "n_train": n_train,
        "n_id": n_id,
    }
    np.save(str(base["queries"]), queries)
    for config in configs:
        name = config["name"]
        spec = {**base, **config, "mode": "sweep", "out": str(workdir / f"run-{tag}-{name}.json")}
        if args.reuse and not Path(spec["out"]).exists():
            continue  # never ran: --reuse runs nothing new
        print(f"  {name}: building (box {args.build_box:.0f} s) ...", flush=True)
        earlier = {c["name"]: c for c in entry["configs"]}.get(name, {})
        record = run_worker(spec, args.build_box, args.search_box, earlier if args.reuse else None)
        rows = []
        for value, setting in record.get("settings", {}).items():
            indices = np.load(workdir / f"run-{tag}-{name}-{value}.npy")
            scores = knn_scores(train, queries, indices) if indices.shape[1] == K_MAX else None
            if scores is None:  # only k = 1 was found: the k = 1 score from the first column
                cosines = np.einsum(
                    "nd,nd->n", np.asarray(train[indices[:, 0]], dtype=np.float64), queries
                )
                scores = {1: cosines}
            row: dict[str, Any] = {
                config["setting"]: int(value),
                "query_s": setting["query_s"],
                "speedup_vs_exact": round(exact_query_s / setting["query_s"], 2),
                "recall_at_1": search.recall_at_k(indices, truth["indices"], 1),
                # the approximate search misses more of the OOD queries' neighbours (they lie
                # between the ID clusters), which lowers OOD scores: ΔAUROC can be positive
                "recall_at_1_id": search.recall_at_k(indices[:n_id], truth["indices"][:n_id], 1),
                "recall_at_1_ood": search.recall_at_k(indices[n_id:], truth["indices"][n_id:], 1),
                "load_1min": setting["load_1min"],
            }
            if indices.shape[1] == K_MAX:
                row["recall_at_10"] = search.recall_at_k(indices, truth["indices"], K_MAX)
            else:
                row["error_k10"] = setting.get("error_k10")
            for k, value_auroc in aurocs(scores, n_id).items():
                row[f"auroc_k{k}"] = value_auroc
                row[f"delta_auroc_k{k}_pts"] = round(100 * (value_auroc - exact_auroc[k]), 3)
            if groups:
                by_set = group_aurocs(scores[1], n_id, groups)
                exact_by_set = entry["exact"]["auroc_k1_by_ood_set"]
                row["auroc_k1_by_ood_set"] = by_set
                row["delta_auroc_k1_pts_by_ood_set"] = {
                    name: round(100 * (value - exact_by_set[name]), 3)
                    for name, value in by_set.items()
                }
            rows.append(row)
            print_row(name, record.get("build_s"), row)
        summary = {key: value for key, value in record.items() if key != "settings"}
        summary.update(name=name, backend=config["backend"], results=rows)
        summary.update({key: config[key] for key in ("n_lists", "hnsw_m") if key in config})
        if record["status"] != "finished":
            print(f"  {name}: {record['status']}", flush=True)
        entry["configs"] = [c for c in entry["configs"] if c["name"] != name] + [summary]
        write_json(args, results)
    if n_train <= args.detector_max_n:
        entry["detector_check"] = detector_check(args, tag, base, configs, exact_scores, entry)
        write_json(args, results)


def detector_check(
    args: argparse.Namespace,
    tag: str,
    base: dict[str, Any],
    configs: list[dict[str, Any]],
    exact_scores: dict[int, npt.NDArray[np.float64]],
    results_entry: dict[str, Any],
) -> list[dict[str, Any]]:
    """KNNDetector itself for the exact backend and one setting of each index family.

    Its scores are compared with the ones this benchmark computes for the same setting (from
    the sweep's neighbours): equal up to rounding where both searches found the same
    neighbours (HNSW's parallel build is not deterministic, so a few may differ there).
    """
    workdir = Path(args.workdir)
    train = np.load(base["train"], mmap_mode="r")[: base["n_train"]]
    queries = np.load(base["queries"])
    previous_checks = results_entry.get("detector_check", [])
    checks: list[dict[str, Any]] = [{"name": "exact", "backend": "exact"}]
    for family in ("faiss-ivf", "faiss-hnsw"):
        family_configs = [c for c in configs if c["backend"] == family]
        if family_configs:
            config = family_configs[0]  # the cheapest build
            value = config["values"][len(config["values"]) // 2]
            checks.append({**config, config["setting"]: value})
    out: list[dict[str, Any]] = []
    n_id = base["n_id"]
    for check in checks:
        setting = check.pop("setting", None)
        check.pop("values", None)
        name = f"detector-{tag}-{check['name']}"
        spec = {**base, **check, "mode": "detector", "out": str(workdir / f"{name}.json")}
        if args.reuse and not Path(spec["out"]).exists():
            continue
        earlier = {c["name"]: c for c in previous_checks}.get(check["name"], {})
        record = run_worker(
            spec, args.build_box + args.search_box, 0, earlier if args.reuse else None
        )
        result = {**check, **record}
        reference = exact_scores
        if setting is not None:
            sweep = workdir / f"run-{tag}-{check['name']}-{check[setting]}.npy"
            indices = np.load(sweep) if sweep.exists() else None
            ok = indices is not None and indices.shape[1] == K_MAX
            reference = knn_scores(train, queries, indices) if indices is not None and ok else {}
        if record["status"] == "finished":
            for k in (1, K_MAX):
                scores = np.load(workdir / f"{name}-k{k}.npy")
                result[f"auroc_k{k}"] = auroc(scores[:n_id], scores[n_id:])
                if k in reference:
                    relative = np.abs(scores - reference[k]) / np.abs(reference[k])
                    result[f"share_equal_to_benchmark_scores_k{k}"] = float(
                        np.mean(relative <= 1e-12)
                    )
                    result[f"auroc_k{k}_benchmark"] = auroc(
                        reference[k][:n_id], reference[k][n_id:]
                    )
        print(f"  KNNDetector {name}: {json.dumps(result)}", flush=True)
        out.append(result)
    return out


def print_row(name: str, build_s: float | None, row: dict[str, Any]) -> None:
    setting = "n_probe" if "n_probe" in row else "ef_search"
    recall10 = f"{row['recall_at_10']:.4f}" if "recall_at_10" in row else "   n/a"
    delta10 = f"{row['delta_auroc_k10_pts']:+7.3f}" if "delta_auroc_k10_pts" in row else "    n/a"
    print(
        f"  {name:<14} {setting}={row[setting]:<4} build {build_s or 0:7.1f} s  query "
        f"{row['query_s']:7.2f} s  x{row['speedup_vs_exact']:<6}  R@1 {row['recall_at_1']:.4f}  "
        f"R@10 {recall10}  AUROC k1 {row['auroc_k1']:.4f} ({row['delta_auroc_k1_pts']:+7.3f})"
        f"  dk10 {delta10}  load {row['load_1min']}",
        flush=True,
    )


def configs_for(args: argparse.Namespace, n_train: int) -> list[dict[str, Any]]:
    """IVF with n_lists = c·√N for each factor c (at least 39 rows per list) and HNSW per M."""
    configs: list[dict[str, Any]] = []
    for factor in args.ivf_sqrt_factors:
        lists = max(1, min(round(factor * math.sqrt(n_train)), n_train // 39))
        configs.append(
            {
                "name": f"ivf{lists}",
                "backend": "faiss-ivf",
                "n_lists": lists,
                "setting": "n_probe",
                "values": [p for p in args.n_probe if p <= lists],
            }
        )
    for m in args.hnsw_m:
        configs.append(
            {
                "name": f"hnsw{m}",
                "backend": "faiss-hnsw",
                "hnsw_m": m,
                "setting": "ef_search",
                "values": list(args.ef_search),
            }
        )
    return configs


def write_json(args: argparse.Namespace, results: dict[str, Any]) -> None:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def print_table(results: dict[str, Any]) -> None:
    print(
        "\n| data | config | build s | query s | speedup | R@1 | R@10 | AUROC k1 | Δ pts | Δ k10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tag, entry in results.items():
        if tag in ("info", "runs") or "exact" not in entry:
            continue
        exact = entry["exact"]
        print(
            f"| {tag} | exact | {exact['prepare_s']} | {exact['query_s']} | 1 | 1 | 1 | "
            f"{exact['auroc_k1']:.4f} | 0 | 0 |"
        )
        for config in entry["configs"]:
            if not config["results"]:
                print(f"| {tag} | {config['name']} | {config['status']} | | | | | | | |")
            for row in config["results"]:
                setting = "n_probe" if "n_probe" in row else "ef_search"
                print(
                    f"| {tag} | {config['name']} {setting}={row[setting]} | "
                    f"{config.get('build_s', '')} | {row['query_s']} | {row['speedup_vs_exact']} | "
                    f"{row['recall_at_1']:.4f} | {row.get('recall_at_10', float('nan')):.4f} | "
                    f"{row['auroc_k1']:.4f} | {row['delta_auroc_k1_pts']:+.3f} | "
                    f"{row.get('delta_auroc_k10_pts', float('nan')):+.3f} |"
                )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731  ("" = none)
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=ints, default=[100_000, 1_000_000])
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--intrinsic-dims", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--ood-clusters", type=int, default=200)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ivf-sqrt-factors", type=floats, default=[1.0, 4.0])
    parser.add_argument("--n-probe", type=ints, default=[1, 4, 8, 16, 64])
    parser.add_argument("--hnsw-m", type=ints, default=[16, 32])
    parser.add_argument("--ef-search", type=ints, default=[16, 32, 64, 128, 256])
    parser.add_argument("--build-box", type=float, default=420.0)
    parser.add_argument("--search-box", type=float, default=420.0)
    parser.add_argument("--detector-max-n", type=int, default=200_000)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="recompute the figures from the worker outputs left in --workdir (no new runs)",
    )
    parser.add_argument("--workdir", default="/tmp/scale-ann")
    parser.add_argument("--cleanup", action="store_true", help="delete --workdir at the end")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()

    import faiss
    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    results: dict[str, Any] = {k: v for k, v in previous.items() if k != "info"}
    runs = previous.get("runs", [previous["info"]] if "info" in previous else [])
    results = {"info": {}, **{k: v for k, v in results.items() if k != "runs"}}
    results["info"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "load_1min_start": load(),
        "versions": {
            "faiss-cpu": faiss.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "k_max": K_MAX,
        "temperature_k10": TEMPERATURE,
        "build_box_s": args.build_box,
        "search_box_s": args.search_box,
        "synthetic": synthetic_params(args),
        "argv": sys.argv[1:],
    }
    results["runs"] = [*runs, results["info"]]
    if not args.skip_real:
        real = write_real(workdir)
        results["info"]["real"] = real
        results.setdefault("real-offline-default", {})["source"] = real
        bounds = np.cumsum([0, *real["parts"].values()])
        groups = {
            name: (int(start), int(stop))
            for name, start, stop in zip(real["parts"], bounds[:-1], bounds[1:], strict=True)
            if name != "id_test"
        }
        run_dataset(
            args,
            "real-offline-default",
            workdir / "train-real.npy",
            workdir / "queries-real.npy",
            real["n_train"],
            real["parts"]["id_test"],
            configs_for(args, real["n_train"]),
            results,
            groups,
        )
    params = synthetic_params(args)
    if not args.skip_synthetic:
        write_synthetic(workdir, max(args.sizes), params)
    for n_train in [] if args.skip_synthetic else sorted(args.sizes):
        run_dataset(
            args,
            f"synthetic-{n_train}",
            workdir / "train.npy",
            workdir / "queries.npy",
            n_train,
            params["n_id_queries"],
            configs_for(args, n_train),
            results,
        )
    results["info"]["load_1min_end"] = load()
    write_json(args, results)
    print_table(results)
    if args.cleanup:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
