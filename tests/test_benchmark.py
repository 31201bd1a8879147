"""The benchmark runner: typed rows, one encoder at a time, failures as rows, overlap warnings."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from oodprobe.benchmark import run_benchmark
from oodprobe.benchmark_spec import spec_from_dict
from oodprobe.detectors import DETECTORS
from oodprobe.detectors.base import Detector
from oodprobe.results import ResultRow

ENCODER = "efficientnet-lite0@32"


def _spec(**top: Any) -> Any:
    config: dict[str, Any] = {
        "name": "small",
        "encoders": [ENCODER],
        "bootstrap": 0,
        "gallery_size": 2,
        "id": {
            "train": {"source": "digits:train", "classes": "0-4", "per_class": 30},
            "test": {"source": "digits:test", "classes": "0-4", "per_class": 10},
        },
        "ood": [{"source": "digits:test", "classes": "5-9", "per_class": 10, "name": "digits 5-9"}],
        "detectors": [{"name": "knn"}, {"name": "mahalanobis", "label": "maha"}],
    }
    config.update(top)
    return spec_from_dict(config)


class _FailingDetector(Detector):
    """Fits, then fails when scoring: the run must go on without it."""

    name: ClassVar[str] = "failing-test"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self) -> None:
        pass

    def fit(self, features: Any, labels: Any = None) -> _FailingDetector:
        self.n_ = len(features)
        return self

    def score_samples(self, features: Any) -> Any:
        raise RuntimeError("scoring exploded")


def test_rows_are_typed_and_record_device_precision_and_fingerprints(
    tmp_path: Path, cache_root: Path
) -> None:
    run = run_benchmark(_spec(), tmp_path / "out", cache_root=cache_root, progress=False)
    assert len(run.rows) == 2 and all(isinstance(row, ResultRow) for row in run.rows)
    record = run.rows[0].as_dict()
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["error"] is None and 0.0 <= record["fpr"] <= 1.0
    assert record["detector_params"]["k"] == 1  # defaults recorded next to the number
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0]["auroc"] == pytest.approx(record["auroc"])
    assert saved["provenance"]["device"] == "cpu"
    assert len({row["id_train_fingerprint"] for row in saved["rows"]}) == 1


def test_a_failing_detector_becomes_rows_with_its_error(
    tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(DETECTORS, "failing-test", _FailingDetector)
    spec = _spec(detectors=[{"name": "failing-test"}, {"name": "knn"}])
    with pytest.warns(UserWarning, match="detector 'failing-test' failed: RuntimeError: scoring"):
        run = run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    failed, good = run.rows
    assert failed.error == "RuntimeError: scoring exploded" and failed.metrics == {}
    assert failed.as_dict()["auroc"] is None
    assert good.error is None and good.metrics["auroc"] > 0.5
    assert (tmp_path / "out" / "report.html").is_file()
    assert not (tmp_path / "out" / "scores" / "efficientnet-lite0_32" / "failing-test.csv").exists()


def test_encoders_are_built_one_at_a_time(
    tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oodprobe.encoders as encoders

    real_create = encoders.create_encoder
    alive: list[weakref.ref[Any]] = []
    live_at_creation: list[int] = []

    def create(name: str) -> Any:
        # no gc.collect() here: the runner collects the released encoder itself
        live_at_creation.append(sum(ref() is not None for ref in alive))
        encoder = real_create(name)
        alive.append(weakref.ref(encoder))
        return encoder

    monkeypatch.setattr(encoders, "create_encoder", create)
    spec = _spec(encoders=[ENCODER, "efficientnet-lite0@40"], detectors=[{"name": "knn"}])
    run = run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    assert live_at_creation == [0, 0]  # the first encoder was released before the second
    assert [row.context.encoder for row in run.rows] == [ENCODER, "efficientnet-lite0@40"]


def test_an_ood_set_equal_to_the_id_test_set_warns(tmp_path: Path, cache_root: Path) -> None:
    test = {"source": "digits:test", "classes": "0-4", "per_class": 10}
    spec = _spec(ood=[{**test, "name": "same"}], detectors=[{"name": "knn"}])
    with pytest.warns(UserWarning, match="OOD set 'same' holds the same images as the ID test"):
        run = run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    assert run.rows[0].metrics["auroc"] == pytest.approx(0.5, abs=0.05)


def test_an_image_only_encoder_with_a_text_detector_is_refused_before_extraction(
    tmp_path: Path, cache_root: Path
) -> None:
    from oodprobe.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="needs a vision-language encoder"):
        run_benchmark(_spec(detectors=[{"name": "mcm"}]), tmp_path / "out", cache_root=cache_root)
    assert not cache_root.exists()  # nothing was extracted


def test_scores_csv_matches_rows(tmp_path: Path, cache_root: Path) -> None:
    import csv

    from oodprobe.metrics import auroc

    run = run_benchmark(
        _spec(detectors=[{"name": "knn"}]),
        tmp_path / "out",
        cache_root=cache_root,
        progress=False,
    )
    path = tmp_path / "out" / "scores" / "efficientnet-lite0_32" / "knn.csv"
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))
    id_scores = np.array([float(r["score"]) for r in records if r["role"] == "id"])
    ood_scores = np.array([float(r["score"]) for r in records if r["role"] == "ood"])
    assert auroc(id_scores, ood_scores) == pytest.approx(run.rows[0].metrics["auroc"])


@pytest.mark.parametrize("clash", ["file", "scores-file", "results-folder"])
def test_an_output_path_the_run_cannot_write_is_refused_before_work(
    tmp_path: Path, cache_root: Path, clash: str
) -> None:
    from oodprobe.errors import InvalidParameterError

    output = tmp_path / "out"
    if clash == "file":
        output.write_text("")
    else:
        output.mkdir()
        if clash == "scores-file":
            (output / "scores").write_text("")
        else:
            (output / "results.json").mkdir()
    with pytest.raises(InvalidParameterError, match=r"(is a file|is a folder)"):
        run_benchmark(_spec(), output, cache_root=cache_root, progress=False)
    assert not cache_root.exists()


def test_one_folder_split_into_train_and_test_is_read_once(
    tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oodprobe.data as data

    real_create = data.create_dataset
    calls: list[str] = []

    def create(source: str, **options: Any) -> Any:
        calls.append(source)
        return real_create(source, **options)

    monkeypatch.setattr(data, "create_dataset", create)
    spec = _spec(
        id={
            "images": {"source": "digits:train", "classes": "0-4", "per_class": 30},
            "test_fraction": 0.25,
        },
        detectors=[{"name": "knn"}],
    )
    run = run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    assert calls.count("digits:train") == 1  # ID images read once, then split
    assert run.rows[0].context.n_train == 5 * round(30 * 0.75)


def test_attack_detectors_are_refused_by_the_runner_before_any_work() -> None:
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.errors import InvalidParameterError
    from oodprobe.pipeline import check_compatibility

    with pytest.raises(InvalidParameterError, match="fitted on clean vs attacked images"):
        check_compatibility(
            [DetectorSpec("class-score-svm")],
            labelled=True,
            id_label="digits",
            encoders={"efficientnet-lite0": None},
        )


def test_a_text_detector_without_class_names_is_refused_before_any_extraction(
    tmp_path: Path, cache_root: Path, tiny_openclip: str
) -> None:
    """A flat image folder has no class names: MCM is refused once the data are listed."""
    from PIL import Image

    from oodprobe.errors import InvalidParameterError

    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    spec = _spec(
        encoders=[tiny_openclip],
        id={"train": {"source": str(folder)}, "test": {"source": str(folder)}},
        ood=[{"source": str(folder), "name": "same"}],
        detectors=[{"name": "mcm"}],
    )
    with pytest.raises(InvalidParameterError, match=r"^text detectors need class names"):
        run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    assert not cache_root.exists()  # nothing was extracted
