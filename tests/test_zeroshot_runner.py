"""The zero-shot methods beyond MCM through the runner: ``oodprobe bench`` offline on a tiny
random open_clip (the real tokeniser and text tower) runs NegLabel (with its corpus embedded and
cached), GL-MCM (on the ``,local`` tokens) and CLIPN's ATD and CTW (on a CLIPN checkpoint); a
second run reads the corpus embeddings from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oodprobe.benchmark_spec import DetectorSpec
from oodprobe.errors import InvalidParameterError, OodprobeError
from oodprobe.pipeline import build_detector, check_compatibility, compute_text_arrays
from test_clipn import ARCH, clipn_state, save_clipn

CORPUS_TERMS = ["zero", "One", "two", "volcano", "harbour", "violin", "glacier", "lantern"]
CORPUS_TERMS += [f"thing {letter}" for letter in "abcdefghijklmnopqrst"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "terms.txt"
    path.write_text("# candidate labels\n" + "\n".join(CORPUS_TERMS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def clipn_name(tiny_openclip: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    import open_clip
    import torch

    torch.manual_seed(1)
    state = clipn_state(open_clip.create_model(ARCH).eval(), seed=2)
    path = save_clipn(state, tmp_path_factory.mktemp("clipn") / "CLIPN_ATD_epoch_10.pt")
    return f"clipn:{ARCH}/{path}"


def _spec(encoders: list[str], corpus: Path) -> Any:
    from oodprobe.benchmark_spec import spec_from_dict

    return spec_from_dict(
        {
            "name": "zero-shot",
            "encoders": encoders,
            "bootstrap": 0,
            "id": {
                "train": {"source": "digits:train", "classes": "0-2", "per_class": 6},
                "test": {"source": "digits:test", "classes": "0-2", "per_class": 4},
                "class_names": ["zero", "one", "two"],
            },
            "ood": [{"source": "digits:test", "classes": "5-6", "per_class": 4, "name": "5-6"}],
            "detectors": [
                {"name": "mcm"},
                {
                    "name": "neglabel",
                    "params": {"corpus": str(corpus), "n_negatives": 10, "n_groups": 2},
                    "label": "neglabel",
                },
                {"name": "gl-mcm"},
                {"name": "clipn-atd"},
                {"name": "clipn-ctw"},
            ],
        }
    )


def test_every_zero_shot_method_runs_end_to_end_and_the_corpus_is_read_from_the_cache(
    tiny_openclip: str,
    clipn_name: str,
    corpus_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import oodprobe.encoders.text as text
    from oodprobe.benchmark import execute_benchmark

    local = f"{tiny_openclip},local"
    spec = _spec([local, clipn_name], corpus_file)
    encoded: list[list[str]] = []
    original = text.compute_class_embeddings

    def counting(encoder: Any, names: Any, *args: Any, **kwargs: Any) -> Any:
        encoded.append(list(names))
        return original(encoder, names, *args, **kwargs)

    monkeypatch.setattr(text, "compute_class_embeddings", counting)
    options: dict[str, Any] = {"cache_root": tmp_path / "cache", "progress": False}
    run = execute_benchmark(spec, tmp_path / "first", skip_inapplicable=True, **options)
    ran = {(row.context.encoder, row.context.detector): row for row in run.rows}
    expected = {
        (local, "mcm"),
        (local, "neglabel"),
        (local, "gl-mcm"),
        (clipn_name, "mcm"),
        (clipn_name, "neglabel"),
        (clipn_name, "clipn-atd"),
        (clipn_name, "clipn-ctw"),
    }
    assert set(ran) == expected  # gl-mcm only on ,local; CLIPN's scores only on CLIPN
    assert all(row.error is None and 0 <= row.metrics["auroc"] <= 1 for row in ran.values())
    corpus_terms = [names for names in encoded if len(names) == len(CORPUS_TERMS)]
    assert len(corpus_terms) >= 2  # one corpus per text tower, embedded once each
    encoded.clear()
    again = execute_benchmark(spec, tmp_path / "second", skip_inapplicable=True, **options)
    assert not [names for names in encoded if len(names) == len(CORPUS_TERMS)]
    for row in again.rows:  # same features, same corpus embeddings: the same scores
        first = ran[(row.context.encoder, row.context.detector)]
        assert row.metrics["auroc"] == pytest.approx(first.metrics["auroc"])


def test_the_corpus_leaves_out_the_id_class_names_and_neglabel_mines_from_the_rest(
    tiny_openclip: str, corpus_file: Path, tmp_path: Path
) -> None:
    from oodprobe.encoders import create_encoder

    encoder = create_encoder(tiny_openclip)
    spec = DetectorSpec("neglabel", {"corpus": str(corpus_file), "n_negatives": 5, "n_groups": 1})
    arrays = compute_text_arrays(
        encoder, ["zero", "one", "two"], "single", [spec], cache_root=tmp_path, progress=False
    )
    embeddings = arrays.corpora[str(corpus_file)]
    assert len(embeddings) == len(CORPUS_TERMS) - 3  # zero, One, two: ID names, any case
    detector = build_detector(spec, encoder, arrays)
    features = np.random.default_rng(0).normal(size=(8, encoder.feature_dim))
    detector.fit(features)
    np.testing.assert_array_equal(np.asarray(detector.corpus_embeddings), embeddings)
    assert detector.negative_embeddings_.shape == (5, encoder.embed_dim)


def test_a_bad_corpus_and_clipn_scores_without_clipn_are_refused_before_any_work(
    tiny_openclip: str, tmp_path: Path
) -> None:
    from oodprobe.benchmark_spec import spec_from_dict

    with pytest.raises(OodprobeError, match="corpus"):
        DetectorSpec("neglabel", {"corpus": "no-such-corpus"})
        spec_from_dict(
            {
                "name": "bad",
                "encoders": [tiny_openclip],
                "id": {"train": {"source": "digits:train"}, "test": {"source": "digits:test"}},
                "ood": [{"source": "digits:test"}],
                "detectors": [{"name": "neglabel", "params": {"corpus": "no-such-corpus"}}],
            }
        )
    with pytest.raises(InvalidParameterError, match="CLIPN"):
        check_compatibility(
            [DetectorSpec("clipn-atd")],
            labelled=True,
            id_label="id",
            encoders={tiny_openclip: None},
        )
