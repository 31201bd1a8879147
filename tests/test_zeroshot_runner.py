"""The zero-shot methods beyond MCM through the runner: ``oodprobe bench`` offline on a tiny
random open_clip (the real tokeniser and text tower) runs NegLabel (with its corpus embedded and
cached), GL-MCM (on the ``,local`` tokens) and CLIPN's ATD and CTW (on a CLIPN checkpoint); a
second run reads the corpus embeddings from the cache."""

from __future__ import annotations

from dataclasses import replace
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


def test_class_names_mined_from_a_corpus_serve_the_text_detectors_and_the_report(
    tiny_openclip: str, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClusterMine-style: no class names given; the run mines them from the corpus, records
    them per cluster (mined_names.json) and shows each cluster with thumbnails.

    A random tiny model maps every digit to nearly one direction, so its own text embeddings
    would give every image the same term; the corpus embeddings are therefore set so that the
    terms "volcano", "harbour" and "violin" lie at the mean joint embedding of digits 0, 1, 2
    (the rest stay the model's): the mined names must be among those three."""
    import json

    import oodprobe.corpus
    from oodprobe.benchmark import create_id_sets, execute_benchmark, finish_benchmark
    from oodprobe.benchmark_spec import spec_from_dict
    from oodprobe.encoders import create_encoder
    from oodprobe.features import extract_features
    from oodprobe.pipeline import joint_embeddings

    spec = spec_from_dict(
        {
            "name": "mined",
            "encoders": [tiny_openclip],
            "bootstrap": 0,
            "gallery_size": 0,
            "id": {
                "train": {"source": "digits:train", "classes": "0-2", "per_class": 10},
                "test": {"source": "digits:test", "classes": "0-2", "per_class": 4},
                "mine": {"corpus": str(corpus_file), "clusters": 3, "min_agreement": 0.0},
            },
            "ood": [{"source": "digits:test", "classes": "5-6", "per_class": 4, "name": "5-6"}],
            "detectors": [{"name": "mcm"}, {"name": "knn"}],
        }
    )
    encoder = create_encoder(tiny_openclip)
    train = extract_features(create_id_sets(spec, False)[0], encoder, cache_root=tmp_path / "cache")
    joint = joint_embeddings(encoder, train.features)
    assert train.labels is not None
    centres = {
        term: joint[train.labels == digit].mean(axis=0)
        for digit, term in enumerate(("volcano", "harbour", "violin"))
    }
    original = oodprobe.corpus.corpus_embeddings

    def placed(model: Any, corpus: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        embeddings = np.array(original(model, corpus, *args, **kwargs))
        for term, centre in centres.items():
            embeddings[corpus.terms.index(term)] = centre / np.linalg.norm(centre)
        return embeddings

    monkeypatch.setattr(oodprobe.corpus, "corpus_embeddings", placed)
    execution = execute_benchmark(spec, tmp_path / "out", cache_root=tmp_path / "cache")
    run = finish_benchmark(execution)
    (record,) = json.loads((tmp_path / "out" / "mined_names.json").read_text())
    names = record["class_names"]
    assert len(names) >= 2 and set(names) <= set(centres)
    assert [cluster["cluster"] for cluster in record["clusters"]] == [0, 1, 2]
    assert sum(cluster["size"] for cluster in record["clusters"]) == 30
    assert all(len(cluster["examples"]) <= 8 for cluster in record["clusters"])
    mcm = next(row for row in run.rows if row.context.detector == "mcm")
    assert mcm.error is None and mcm.context.class_names == names
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Mined cluster 0" in html and record["clusters"][0]["examples"][0]["source"] in html


def test_mining_settings_are_checked_when_the_spec_is_built(corpus_file: Path) -> None:
    from oodprobe.benchmark_spec import spec_from_dict

    def spec(mine: Any, **extra: Any) -> Any:
        return spec_from_dict(
            {
                "id": {
                    "train": {"source": "digits:train"},
                    "test": {"source": "digits:test"},
                    "mine": mine,
                    **extra,
                },
                "ood": [{"source": "digits:test"}],
            }
        )

    for mine, message in [
        ({"corpus": str(corpus_file), "clusters": 1}, "clusters must be an integer >= 2"),
        ({"corpus": str(corpus_file), "min_agreement": 2}, "min_agreement must be a number"),
        ({"corpus": "no-such-corpus"}, "corpus"),
        ({"corpus": str(corpus_file), "k": 3}, "unknown key 'k'"),
        (
            {"corpus": str(corpus_file), "seed": 2**32},
            r"seed must be an integer in \[0, 4294967295\]",
        ),
    ]:
        with pytest.raises(OodprobeError, match=message):
            spec(mine)
    with pytest.raises(InvalidParameterError, match="both class_names and mine"):
        spec({"corpus": str(corpus_file)}, class_names=["a", "b"])


def test_mined_names_are_not_mixed_with_the_id_labels_when_the_spec_is_built(
    corpus_file: Path,
) -> None:
    """A zero-shot head over mined names has a row per mined name, not per ID class: averaging
    it with a probe's (row c: class c) or fitting it on the labels would pair unrelated
    classes, silently when the counts agree. Refused with the spec; alone it runs."""
    from oodprobe.benchmark_spec import spec_from_dict

    def spec(detector: dict[str, Any]) -> Any:
        return spec_from_dict(
            {
                "encoders": ["openclip:ViT-B-16/openai"],
                "id": {
                    "train": {"source": "digits:train"},
                    "test": {"source": "digits:test"},
                    "mine": {"corpus": str(corpus_file), "clusters": 10},
                },
                "ood": [{"source": "digits:test"}],
                "detectors": [detector],
            }
        )

    for detector in [
        {"name": "prob-ensemble", "params": {"heads": ["probe", "zero-shot"]}},
        {"name": "temp-msp", "params": {"head": "zero-shot"}},
        {"name": "score-ensemble", "params": {"members": ["mcm", "temp-msp:head=zero-shot"]}},
    ]:
        with pytest.raises(InvalidParameterError, match="mined names"):
            spec(detector)
    for detector in [
        {"name": "prob-ensemble", "params": {"heads": ["zero-shot"]}},
        {"name": "gen", "params": {"head": "zero-shot"}},
        {"name": "temp-msp", "params": {"head": "probe"}},
        {"name": "neglabel", "params": {"corpus": str(corpus_file)}},
    ]:
        spec(detector)


def test_the_corpus_is_embedded_on_the_runs_device(
    tiny_openclip: str, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extraction hands the encoder back on the CPU; the corpus (WordNet: hours on a CPU, for
    NegLabel and for mining) must be embedded on the device the run was given, not there."""
    import oodprobe.corpus
    from oodprobe.benchmark import execute_benchmark

    devices: list[Any] = []
    original = oodprobe.corpus.corpus_embeddings

    def recording(*args: Any, **kwargs: Any) -> np.ndarray:
        devices.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(oodprobe.corpus, "corpus_embeddings", recording)
    spec = _spec([tiny_openclip], corpus_file)
    spec = replace(spec, detectors=spec.detectors[:2])  # mcm, neglabel
    run = execute_benchmark(
        spec, tmp_path / "out", cache_root=tmp_path / "cache", device="cpu", progress=False
    )
    assert devices == ["cpu"]  # NegLabel's corpus, embedded once
    assert {row.error for row in run.rows} == {None}


def test_variants_sharing_a_text_tower_share_its_cached_corpus_embeddings(
    tiny_openclip: str, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus embedded for the plain CLIP serves its ,local variant, its tapped pass and a
    concatenation holding it (their image outputs differ, their text tower does not)."""
    import oodprobe.encoders.text as text
    from oodprobe.corpus import corpus_embeddings, load_corpus
    from oodprobe.encoders import create_encoder, create_shared_encoder

    corpus = load_corpus(corpus_file)
    plain = create_encoder(tiny_openclip)
    expected = corpus_embeddings(plain, corpus, ("a photo of a {}.",), cache_root=tmp_path)
    calls: list[int] = []
    original = text.compute_class_embeddings

    def counting(encoder: Any, names: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(names))
        return original(encoder, names, *args, **kwargs)

    monkeypatch.setattr(text, "compute_class_embeddings", counting)
    variants = [
        create_encoder(f"{tiny_openclip},local"),
        create_shared_encoder([tiny_openclip, f"{tiny_openclip},layer=1"])[0],
        create_encoder(f"concat:efficientnet-lite0@32+{tiny_openclip}"),
    ]
    for variant in variants:
        assert variant.cache_id != plain.cache_id
        assert variant.text_cache_id == plain.text_cache_id == plain.cache_id
        embeddings = corpus_embeddings(variant, corpus, ("a photo of a {}.",), cache_root=tmp_path)
        np.testing.assert_array_equal(embeddings, expected)
    assert calls == []  # nothing encoded again
