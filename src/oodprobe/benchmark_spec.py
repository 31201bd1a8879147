"""Benchmarks as data: a TOML file (or a built-in preset) validated into a BenchmarkSpec.

```toml
name = "fashion-near-ood"
encoders = ["efficientnet-lite0"]
convention = "oodprobe"            # metric convention preset (oodprobe.metrics.CONVENTIONS)
bootstrap = 200                    # percentile-bootstrap resamples for confidence intervals

[id]
train = { source = "fashion-mnist:train", classes = "0-4", per_class = 500 }
test = { source = "fashion-mnist:test", classes = "0-4" }
# class_names = ["T-shirt", ...]   # optional: for text detectors; default: the dataset's names
# prompts = "ensemble"              # "ensemble" (5 prompts), "single", or a list with "{}"

[[ood]]
name = "fashion 5-9"
source = "fashion-mnist:test"
classes = "5-9"
group = "near"                     # "near" or "far"

[[detectors]]
name = "knn"
params = { k = 1 }
```

Relative folder paths in ``source`` are resolved against the TOML file's folder.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from oodprobe.errors import InvalidParameterError, UnknownNameError

GROUPS = ("near", "far")


@dataclass(frozen=True)
class DataSpec:
    """Where a set of images comes from, and which of them to use."""

    source: str
    classes: tuple[int | str, ...] | None = None
    per_class: int | None = None
    limit: int | None = None
    name: str | None = None
    group: str = "far"
    seed: int = 0

    @property
    def label(self) -> str:
        """The name shown in tables."""
        if self.name:
            return self.name
        if self.classes is None:
            return self.source
        return f"{self.source}[{','.join(map(str, self.classes))}]"

    def create(self, download: bool = False) -> Any:
        """Build the ImageDataset this spec names."""
        from oodprobe.data import create_dataset

        dataset = create_dataset(
            self.source,
            classes=list(self.classes) if self.classes is not None else None,
            per_class=self.per_class,
            limit=self.limit,
            seed=self.seed,
            download=download,
        )
        return dataset


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector name with hyperparameters, and the label it gets in tables."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if not self.params:
            return self.name
        options = ",".join(f"{key}={value}" for key, value in sorted(self.params.items()))
        return f"{self.name}({options})"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything a benchmark run needs: ID data, OOD sets, encoders, detectors, metrics."""

    name: str
    id_train: DataSpec
    id_test: DataSpec
    ood: tuple[DataSpec, ...]
    encoders: tuple[str, ...]
    detectors: tuple[DetectorSpec, ...]
    class_names: tuple[str, ...] | None = None
    prompts: str | tuple[str, ...] = "ensemble"
    convention: str = "oodprobe"
    tpr: float = 0.95
    bootstrap: int = 200
    seed: int = 0
    gallery_size: int = 12
    description: str = ""

    def with_overrides(
        self, *, encoders: Sequence[str] | None = None, detectors: Sequence[str] | None = None
    ) -> BenchmarkSpec:
        """A copy with other encoders and/or detectors (``NAME`` or ``NAME:key=value,…``)."""
        spec = self
        if encoders:
            spec = replace(spec, encoders=tuple(encoders))
        if detectors:
            spec = replace(spec, detectors=tuple(parse_detector_option(d) for d in detectors))
        return validate(spec)


def parse_detector_option(text: str) -> DetectorSpec:
    """``knn`` or ``knn:k=10,temperature=0.1`` → DetectorSpec (values parsed as TOML scalars)."""
    name, _, options = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(
                f"detector option {item!r} in {text!r} must look like key=value"
            )
        try:
            params[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = value.strip()
    return DetectorSpec(name=name.strip(), params=params)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InvalidParameterError(
            f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(sorted(allowed))}"
        )


def _as_classes(value: Any, where: str) -> tuple[int | str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        from oodprobe.data import parse_class_selection

        return tuple(parse_class_selection(value))
    if isinstance(value, list) and all(isinstance(v, (int, str)) for v in value):
        return tuple(value)
    raise InvalidParameterError(
        f"{where}.classes must be a string like '0-4' or a list, got {value!r}"
    )


def _positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError(f"{where} must be a positive integer, got {value!r}")
    return value


_DATA_KEYS = {"source", "classes", "per_class", "limit", "name", "group", "seed"}


def _data_spec(table: Any, where: str, base_dir: Path | None) -> DataSpec:
    if isinstance(table, str):
        table = {"source": table}
    if not isinstance(table, Mapping):
        raise InvalidParameterError(f"{where} must be a table with a 'source', got {table!r}")
    _check_keys(table, _DATA_KEYS, where)
    source = table.get("source")
    if not isinstance(source, str) or not source:
        raise InvalidParameterError(f"{where} needs a 'source' (dataset name or folder)")
    source = os.path.expandvars(source)
    if base_dir is not None and (source.startswith(".") or "/" in source):
        candidate = Path(source).expanduser()
        if not candidate.is_absolute():
            source = str((base_dir / candidate).resolve())
    group = table.get("group", "far")
    if group not in GROUPS:
        raise InvalidParameterError(f"{where}.group must be 'near' or 'far', got {group!r}")
    return DataSpec(
        source=source,
        classes=_as_classes(table.get("classes"), where),
        per_class=_positive_int(table.get("per_class"), f"{where}.per_class"),
        limit=_positive_int(table.get("limit"), f"{where}.limit"),
        name=table.get("name"),
        group=group,
        seed=int(table.get("seed", 0)),
    )


_TOP_KEYS = {
    "name",
    "description",
    "encoders",
    "detectors",
    "id",
    "ood",
    "convention",
    "tpr",
    "bootstrap",
    "seed",
    "gallery_size",
}
_ID_KEYS = {"train", "test", "class_names", "prompts"}


def spec_from_dict(config: Mapping[str, Any], base_dir: Path | None = None) -> BenchmarkSpec:
    """Validate a parsed TOML document into a BenchmarkSpec; errors name the offending key."""
    _check_keys(config, _TOP_KEYS, "the benchmark config")
    id_table = config.get("id")
    if not isinstance(id_table, Mapping):
        raise InvalidParameterError("the benchmark config needs an [id] table with train and test")
    _check_keys(id_table, _ID_KEYS, "[id]")
    for key in ("train", "test"):
        if key not in id_table:
            raise InvalidParameterError(f"[id] needs '{key}' (a dataset name or a table)")
    ood_tables = config.get("ood")
    if not isinstance(ood_tables, list) or not ood_tables:
        raise InvalidParameterError("the benchmark config needs at least one [[ood]] set")
    detectors = []
    for index, table in enumerate(config.get("detectors", [])):
        if isinstance(table, str):
            detectors.append(parse_detector_option(table))
            continue
        _check_keys(table, {"name", "params", "label"}, f"[[detectors]] #{index + 1}")
        if "name" not in table:
            raise InvalidParameterError(f"[[detectors]] #{index + 1} needs a 'name'")
        detectors.append(
            DetectorSpec(table["name"], dict(table.get("params", {})), table.get("label", ""))
        )
    encoders = config.get("encoders", ["efficientnet-lite0"])
    if isinstance(encoders, str):
        encoders = [encoders]
    prompts = id_table.get("prompts", "ensemble")
    class_names = id_table.get("class_names")
    spec = BenchmarkSpec(
        name=str(config.get("name", "benchmark")),
        description=str(config.get("description", "")),
        id_train=_data_spec(id_table["train"], "[id].train", base_dir),
        id_test=_data_spec(id_table["test"], "[id].test", base_dir),
        ood=tuple(_data_spec(t, f"[[ood]] #{i + 1}", base_dir) for i, t in enumerate(ood_tables)),
        encoders=tuple(encoders),
        detectors=tuple(detectors),
        class_names=tuple(class_names) if class_names is not None else None,
        prompts=prompts if isinstance(prompts, str) else tuple(prompts),
        convention=str(config.get("convention", "oodprobe")),
        tpr=float(config.get("tpr", 0.95)),
        bootstrap=int(config.get("bootstrap", 200)),
        seed=int(config.get("seed", 0)),
        gallery_size=int(config.get("gallery_size", 12)),
    )
    return validate(spec)


def validate(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Cheap checks that need no data or model: names, numbers, duplicates."""
    from oodprobe.detectors import DETECTORS, detector_names
    from oodprobe.encoders.text import PROMPT_SETS
    from oodprobe.metrics import get_convention

    get_convention(spec.convention)
    if not spec.encoders:
        raise InvalidParameterError("the benchmark lists no encoders")
    if not spec.detectors:
        raise InvalidParameterError("the benchmark lists no detectors")
    detector_names()  # imports the registry
    for detector in spec.detectors:
        if detector.name not in DETECTORS:
            raise UnknownNameError("detector", detector.name, DETECTORS)
    labels = [d.display for d in spec.detectors]
    if len(set(labels)) != len(labels):
        raise InvalidParameterError(f"detector labels must be unique, got {labels}")
    ood_labels = [o.label for o in spec.ood]
    if len(set(ood_labels)) != len(ood_labels):
        raise InvalidParameterError(f"OOD set names must be unique, got {ood_labels}")
    if isinstance(spec.prompts, str) and spec.prompts not in PROMPT_SETS:
        raise InvalidParameterError(
            f"prompts must be one of {', '.join(PROMPT_SETS)} or a list, got {spec.prompts!r}"
        )
    if not 0 < spec.tpr <= 1:
        raise InvalidParameterError(f"tpr must be in (0, 1], got {spec.tpr}")
    if spec.bootstrap < 0:
        raise InvalidParameterError(f"bootstrap must be >= 0, got {spec.bootstrap}")
    return spec


def load_benchmark(path: str | os.PathLike[str]) -> BenchmarkSpec:
    """Read and validate a benchmark TOML file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"benchmark config not found: {path}")
    try:
        config = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidParameterError(f"{path} is not valid TOML: {error}") from None
    return spec_from_dict(config, base_dir=path.parent.resolve())


BENCHMARKS: dict[str, Callable[[], BenchmarkSpec]] = {}


def _register_presets() -> None:
    from oodprobe import presets as _  # noqa: F401  (importing it fills BENCHMARKS)


def benchmark_names() -> list[str]:
    """The names of the built-in presets, in registration order."""
    _register_presets()
    return list(BENCHMARKS)


def create_benchmark(name: str) -> BenchmarkSpec:
    """A built-in preset by name."""
    _register_presets()
    try:
        return BENCHMARKS[name]()
    except KeyError:
        raise UnknownNameError("benchmark preset", name, BENCHMARKS) from None
