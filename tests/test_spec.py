"""Benchmark specs: every value refused when the spec is built, in one line, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oodprobe.benchmark_spec import (
    BenchmarkSpec,
    DataSpec,
    DetectorSpec,
    load_benchmark,
    parse_detector_option,
    spec_from_dict,
    validate,
)
from oodprobe.errors import InvalidParameterError, UnknownNameError


def _config(**top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "t",
        "id": {"train": "digits:train", "test": "digits:test"},
        "ood": [{"source": "textures"}],
        "detectors": [{"name": "knn"}],
    }
    config.update(top)
    return config


def _error(config: dict[str, Any]) -> str:
    with pytest.raises(InvalidParameterError) as caught:
        spec_from_dict(config)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("bootstrap", "many", "bootstrap must be an integer >= 0, got 'many'"),
        ("bootstrap", -1, "bootstrap must be an integer >= 0, got -1"),
        ("bootstrap", True, "bootstrap must be an integer >= 0, got True"),
        ("tpr", "high", "tpr must be a number in (0, 1], got 'high'; e.g. tpr = 0.95 for FPR@95"),
        ("tpr", 95, "tpr must be a number in (0, 1], got 95; e.g. tpr = 0.95 for FPR@95"),
        ("seed", "x", "seed must be an integer >= 0, got 'x'"),
        ("seed", -1, "seed must be an integer >= 0, got -1"),
        ("gallery_size", 1.5, "gallery_size must be an integer >= 0, got 1.5"),
        ("description", 3, "description must be a string, got 3"),
        ("encoders", [1], "encoders must be a list of non-empty strings, got [1]"),
    ],
)
def test_wrong_top_level_types_are_one_line(key: str, value: Any, expected: str) -> None:
    assert _error(_config(**{key: value})) == expected


def test_unknown_convention_and_encoder_are_refused_with_choices() -> None:
    with pytest.raises(UnknownNameError, match="unknown metric convention 'nope'; choose from"):
        spec_from_dict(_config(convention="nope"))
    with pytest.raises(UnknownNameError, match="unknown encoder 'resnet99'; choose from"):
        spec_from_dict(_config(encoders=["resnet99"]))


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/abs", "..", ".hidden", "x\\y", ""])
def test_names_that_would_leave_the_output_folder_are_refused(name: str) -> None:
    message = _error(_config(name=name))
    assert message.startswith("name ") or message == "name must be a non-empty string, got ''"


def test_plain_names_are_accepted() -> None:
    assert spec_from_dict(_config(name="my bench-1.0_a")).name == "my bench-1.0_a"


def test_detector_params_must_be_a_table() -> None:
    config = _config(detectors=[{"name": "knn", "params": "k=1"}])
    assert _error(config) == ("[[detectors]] #1 params must be a table like { k = 1 }, got 'k=1'")


def test_unknown_detector_parameter_is_refused_when_the_spec_is_built() -> None:
    message = _error(_config(detectors=[{"name": "knn", "params": {"kk": 3}}]))
    assert message.startswith("unknown parameter 'kk' for detector 'knn'; valid parameters: ")
    assert "k" in message.split("valid parameters: ")[1].split(", ")


def test_wrong_detector_parameter_type_from_the_command_line() -> None:
    spec = spec_from_dict(_config())
    with pytest.raises(InvalidParameterError) as caught:
        spec.with_overrides(detectors=["knn:k=abc"])
    message = str(caught.value)
    assert "knn" in message and "'abc'" in message and "\n" not in message


def test_unknown_detector_name_lists_choices() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown detector 'knnn'; choose from: .*knn"):
        spec_from_dict(_config(detectors=["knnn"]))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"source": "digits", "per_class": 0}, "[[ood]] #1.per_class must be an integer >= 1"),
        ({"source": "digits", "limit": "ten"}, "[[ood]] #1.limit must be an integer >= 1"),
        ({"source": "digits", "seed": 1.5}, "[[ood]] #1.seed must be an integer, got 1.5"),
        ({"source": "digits", "group": "middle"}, "[[ood]] #1.group must be 'near' or 'far'"),
        ({"source": "digits", "name": 7}, "[[ood]] #1.name must be a non-empty string, got 7"),
        ({"source": 3}, "[[ood]] #1.source must be a non-empty string, got 3"),
        ({"source": "digits", "kind": 1}, "unknown key 'kind' in [[ood]] #1; valid keys"),
        ({"source": "digits", "classes": 3}, "[[ood]] #1.classes must be a string like '0-4'"),
    ],
)
def test_data_tables_are_checked(table: dict[str, Any], expected: str) -> None:
    assert _error(_config(ood=[table])).startswith(expected)


def test_prompts_and_class_names_are_checked() -> None:
    assert _error(_config(id={"train": "a", "test": "b", "prompts": "many"})).startswith(
        "prompts must be one of ensemble, single"
    )
    assert _error(_config(id={"train": "a", "test": "b", "prompts": ["a photo"]})) == (
        "[id].prompts: each prompt needs a '{}' where the class name goes, got ('a photo',)"
    )
    assert _error(_config(id={"train": "a", "test": "b", "class_names": "cat"})) == (
        "[id].class_names must be a list of non-empty strings, got 'cat'"
    )


def test_duplicate_detector_labels_also_as_file_names() -> None:
    config = _config(
        detectors=[{"name": "knn", "label": "a/b"}, {"name": "deep-knn", "label": "a b"}]
    )
    assert _error(config).startswith("detector labels must be unique (also as file names)")


def test_one_folder_split_into_train_and_test() -> None:
    spec = spec_from_dict(
        _config(id={"images": {"source": "digits:train", "seed": 3}, "test_fraction": 0.25})
    )
    assert spec.id_train.part == "train" and spec.id_test.part == "test"
    assert spec.id_train.test_fraction == spec.id_test.test_fraction == 0.25
    assert spec.id_train.label == "digits:train (train 75%)"
    assert spec.id_test.label == "digits:train (test 25%)"
    assert spec.id_train.seed == 3


@pytest.mark.parametrize(
    ("id_table", "expected"),
    [
        ({"images": "digits", "test_fraction": 1.5}, "test_fraction must be a number in (0, 1)"),
        ({"images": "digits"}, "[id] needs both 'images'"),
        ({"images": "digits", "test_fraction": 0.2, "train": "x"}, "[id] takes either"),
        ({"train": "digits"}, "[id] needs 'test'"),
    ],
)
def test_split_tables_are_checked(id_table: dict[str, Any], expected: str) -> None:
    assert expected in _error(_config(id=id_table))


def test_split_datasets_are_disjoint_and_cover_the_images() -> None:
    spec = spec_from_dict(_config(id={"images": {"source": "digits:train"}, "test_fraction": 0.2}))
    train, test = spec.id_train.create(), spec.id_test.create()
    whole = DataSpec("digits:train").create()
    train_names = {train.describe(i) for i in range(len(train))}
    test_names = {test.describe(i) for i in range(len(test))}
    assert not train_names & test_names
    assert len(train) + len(test) == len(whole)
    assert abs(len(test) - 0.2 * len(whole)) <= 10  # stratified rounding per class


def test_overrides_are_validated() -> None:
    spec = spec_from_dict(_config())
    assert spec.with_overrides(seed=5, bootstrap=0, convention="openood").seed == 5
    with pytest.raises(InvalidParameterError, match="bootstrap must be an integer >= 0"):
        spec.with_overrides(bootstrap=-2)


def test_a_spec_built_in_code_is_validated_too() -> None:
    data = DataSpec("digits")
    spec = BenchmarkSpec("t", data, data, (data,), ("efficientnet-lite0",), (DetectorSpec("knn"),))
    assert validate(spec) is spec
    with pytest.raises(InvalidParameterError, match="tpr must be a number"):
        validate(
            BenchmarkSpec(
                "t",
                data,
                data,
                (data,),
                ("efficientnet-lite0",),
                (DetectorSpec("knn"),),
                tpr=float("nan"),
            )
        )


def test_detector_options_with_a_repeated_key_or_no_name_are_refused() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_detector_option("knn:k=1,k=2")
    assert str(caught.value) == "detector option 'knn:k=1,k=2' sets 'k' twice; give each key once"
    with pytest.raises(InvalidParameterError, match="detector option ':k=1' has no detector name"):
        parse_detector_option(":k=1")


def test_a_probe_device_this_machine_lacks_is_refused_when_the_spec_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = spec_from_dict(_config())
    with pytest.raises(InvalidParameterError, match="device 'cuda' was requested but no CUDA"):
        spec.with_overrides(detectors=["linear-probe:device=cuda"])


def test_detector_option_parsing() -> None:
    spec = parse_detector_option("knn:k=10,backend=exact")
    assert spec.name == "knn" and dict(spec.params) == {"k": 10, "backend": "exact"}
    with pytest.raises(InvalidParameterError, match="must look like key=value"):
        parse_detector_option("knn:k")


def test_toml_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("name = ")
    with pytest.raises(InvalidParameterError, match="is not valid TOML"):
        load_benchmark(path)
    with pytest.raises(InvalidParameterError, match="benchmark config not found"):
        load_benchmark(tmp_path / "missing.toml")


def test_a_config_without_detectors_runs_the_label_free_knn() -> None:
    config = {
        "id": {"train": "digits:train", "test": "digits:test"},
        "ood": [{"source": "skimage-textures"}],
    }
    assert [d.display for d in spec_from_dict(config).detectors] == ["knn"]
    with pytest.raises(InvalidParameterError, match="lists no detectors"):
        spec_from_dict({**config, "detectors": []})


def test_detector_option_keeps_commas_inside_arrays_and_quotes() -> None:
    spec = parse_detector_option(
        'score-ensemble:members=["knn:k=1","mahalanobis"],normalize=rank,weights=[1, 2]'
    )
    assert spec.name == "score-ensemble"
    assert spec.params == {
        "members": ["knn:k=1", "mahalanobis"],
        "normalize": "rank",
        "weights": [1, 2],
    }
    spec = parse_detector_option("prob-ensemble:heads=['probe','zero-shot'],score='a,b'")
    assert spec.params == {"heads": ["probe", "zero-shot"], "score": "a,b"}
