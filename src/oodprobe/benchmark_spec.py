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
# mine = { corpus = "wordnet", clusters = 10 }  # no names: mine them (ClusterMine-style)

[[ood]]
name = "fashion 5-9"
source = "fashion-mnist:test"
classes = "5-9"
group = "near"                     # "near" or "far"

[[detectors]]
name = "knn"
params = { k = 1 }
```

Relative folder paths in ``source`` are resolved against the TOML file's folder. With one
folder of ID images, let oodprobe split it (seeded, stratified by class):

```toml
[id]
images = { source = "my-photos/", seed = 0 }
test_fraction = 0.2                # 20% of each class becomes the ID test set
```

Every value is checked here, when the spec is built, before any image is read: types, ranges,
names (encoders, detectors, conventions, prompt sets) and each detector's parameters, by the
detector class itself. The benchmark ``name`` becomes the output folder's name, so it must be a
plain name (no path separators, no ``..``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from oodprobe.errors import InvalidParameterError, UnknownNameError

GROUPS = ("near", "far")
SPLIT_PARTS = ("train", "test")
# a benchmark name is an output folder name: letters, digits and . _ - (not leading), spaces
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")


@dataclass(frozen=True)
class DataSpec:
    """Where a set of images comes from, and which of them to use.

    With ``test_fraction``, the selected images are split (seeded by ``seed``, stratified by
    class) and ``part`` (``train`` or ``test``) names the share this spec takes.
    """

    source: str
    classes: tuple[int | str, ...] | None = None
    per_class: int | None = None
    limit: int | None = None
    name: str | None = None
    group: str = "far"
    seed: int = 0
    test_fraction: float | None = None
    part: str | None = None

    @property
    def label(self) -> str:
        """The name shown in tables."""
        if self.name:
            base = self.name
        elif self.classes is None:
            base = self.source
        else:
            base = f"{self.source}[{','.join(map(str, self.classes))}]"
        if self.test_fraction is None:
            return base
        share = self.test_fraction if self.part == "test" else 1 - self.test_fraction
        return f"{base} ({self.part} {share:.0%})"

    def create(self, download: bool = False) -> Any:
        """Build the ImageDataset this spec names (its part of the split, with test_fraction)."""
        if self.test_fraction is None:
            return self._create_whole(download)
        train, test = self.create_split(download)
        return test if self.part == "test" else train

    def split_of(self, other: DataSpec) -> bool:
        """Whether ``other`` is the other part of the same split (the same images, once read)."""
        return replace(self, part=None) == replace(other, part=None) and self.part != other.part

    def create_split(self, download: bool = False) -> tuple[Any, Any]:
        """(train, test): the selected images read once, then split (seeded, stratified)."""
        from oodprobe.data import split_dataset

        if self.test_fraction is None:
            raise InvalidParameterError(f"{self.label!r} has no test_fraction to split by")
        return split_dataset(self._create_whole(download), self.test_fraction, seed=self.seed)

    def _create_whole(self, download: bool) -> Any:
        from oodprobe.data import create_dataset

        return create_dataset(
            self.source,
            classes=list(self.classes) if self.classes is not None else None,
            per_class=self.per_class,
            limit=self.limit,
            seed=self.seed,
            download=download,
        )


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


MAX_STUDY_BOOTSTRAP = 100_000


@dataclass(frozen=True)
class StudySpec:
    """What ``oodprobe study`` adds to a benchmark (the TOML's ``[study]`` table).

    ``encoders``: the models to compare (empty: the benchmark's ``encoders``);
    ``bootstrap``: resamples of the models for the fit's intervals (0: none);
    ``confidence``: level of those intervals.
    """

    encoders: tuple[str, ...] = ()
    bootstrap: int = 1000
    confidence: float = 0.95


@dataclass(frozen=True)
class MiningSpec:
    """``[id] mine = {...}``: ID class names mined from a corpus, for data without names.

    ClusterMine-style (Adaloglou et al., WACV 2026): the ID training images are clustered
    (``clusters``, k-means seeded by ``seed``) in the joint space, and each cluster gets the
    ``names_per_cluster`` corpus terms whose zero-shot choice agrees with it on at least
    ``min_agreement`` of their images (:func:`oodprobe.mining.mine_positive_labels`); the mined
    names are the class names of the text detectors (MCM, PLP, NegLabel).
    """

    corpus: str = "wordnet"
    clusters: int = 10
    names_per_cluster: int = 1
    min_agreement: float = 0.5
    seed: int = 0


_SEED_MAX = 2**32 - 1  # k-means' random_state: numpy's seed range
_MINE_KEYS = {"corpus", "clusters", "names_per_cluster", "min_agreement", "seed"}


def _check_mining(
    mining: MiningSpec, class_names: Sequence[str] | None, detectors: Sequence[DetectorSpec]
) -> None:
    from oodprobe.corpus import check_corpus_source

    if class_names is not None:
        raise InvalidParameterError(
            "[id] has both class_names and mine; give the names, or mine them, not both"
        )
    bounds = {"clusters": (2, None), "names_per_cluster": (1, None), "seed": (0, _SEED_MAX)}
    for key, (low, high) in bounds.items():
        value = getattr(mining, key)
        bad = not isinstance(value, int) or isinstance(value, bool) or value < low
        if bad or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise InvalidParameterError(
                f"[id].mine.{key} must be an integer {bound}, got {value!r}"
            )
    agreement = mining.min_agreement
    if (
        isinstance(agreement, bool)
        or not isinstance(agreement, (int, float))
        or not (0 <= agreement <= 1)
    ):
        raise InvalidParameterError(
            f"[id].mine.min_agreement must be a number in [0, 1], got {agreement!r}"
        )
    check_corpus_source(mining.corpus)
    _check_heads_over_mined_names(detectors)


def _check_heads_over_mined_names(detectors: Sequence[DetectorSpec]) -> None:
    """Refuse a zero-shot head that meets the ID labels: over mined names its row c is the
    c-th mined name, not class c, so averaging it with a probe or encoder head, or fitting it
    on the labels, would pair unrelated classes (silently when the counts agree)."""
    from oodprobe.detectors import DETECTORS
    from oodprobe.detectors.posthoc import head_kinds
    from oodprobe.pipeline import head_sources, member_specs

    pending = list(detectors)
    while pending:
        detector = pending.pop()
        pending.extend(member_specs(detector))
        sources = head_sources(detector)
        kinds = set(head_kinds(sources))
        if "zero-shot" in kinds and (
            len(kinds) > 1 or DETECTORS[detector.name].uses_labels(detector.params)
        ):
            raise InvalidParameterError(
                f"detector {detector.display!r} with head(s) {', '.join(sources)}: with [id] mine "
                f"the zero-shot head's rows are the mined names, not the ID classes, so it cannot "
                f"be combined with a probe or encoder head or fitted on the ID labels; use the "
                f"zero-shot head alone, or give class_names instead of mine"
            )


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
    seed: int = 0  # of the bootstrap resampling; data tables and probes carry their own
    gallery_size: int = 12
    description: str = ""
    study: StudySpec = field(default_factory=StudySpec)
    mining: MiningSpec | None = None

    def with_overrides(
        self,
        *,
        encoders: Sequence[str] | None = None,
        detectors: Sequence[str] | None = None,
        seed: int | None = None,
        bootstrap: int | None = None,
        convention: str | None = None,
    ) -> BenchmarkSpec:
        """A validated copy with other encoders, detectors (``NAME[:key=value,…]``), seed, …."""
        changes: dict[str, Any] = {}
        if encoders:
            changes["encoders"] = tuple(encoders)
        if detectors:
            changes["detectors"] = tuple(parse_detector_option(d) for d in detectors)
        for key, value in (("seed", seed), ("bootstrap", bootstrap), ("convention", convention)):
            if value is not None:
                changes[key] = value
        return validate(replace(self, **changes))


def parse_detector_option(text: str) -> DetectorSpec:
    """``knn`` or ``knn:k=10,temperature=0.1`` → DetectorSpec (values parsed as TOML scalars).

    A value that is not TOML stays a string (``backend=exact``); the detector class checks
    names and types when the spec is validated. Commas inside brackets or quotes belong to the
    value: ``score-ensemble:members=["knn:k=1","mahalanobis"],normalize=rank``.
    """
    name, _, options = text.partition(":")
    if not name.strip():
        raise InvalidParameterError(
            f"detector option {text!r} has no detector name; write NAME or NAME:key=value,…"
        )
    params: dict[str, Any] = {}
    for item in filter(None, _split_options(options)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(
                f"detector option {item!r} in {text!r} must look like key=value"
            )
        if key.strip() in params:
            raise InvalidParameterError(
                f"detector option {text!r} sets {key.strip()!r} twice; give each key once"
            )
        try:
            params[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = value.strip()
    return DetectorSpec(name=name.strip(), params=params)


def _split_options(options: str) -> list[str]:
    """``options`` split at the commas outside brackets, braces and quotes (TOML arrays)."""
    items, depth, quote, start = [], 0, "", 0
    for position, character in enumerate(options):
        if quote:
            quote = "" if character == quote else quote
        elif character in "\"'":
            quote = character
        elif character in "[{":
            depth += 1
        elif character in "]}":
            depth = max(0, depth - 1)
        elif character == "," and depth == 0:
            items.append(options[start:position])
            start = position + 1
    items.append(options[start:])
    return items


# --------------------------------------------------------------------------------------------
# value checks: the one home of the spec's type and range validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(value: Any, where: str, *, minimum: int | None = None) -> None:
    if not _is_int(value) or (minimum is not None and value < minimum):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise InvalidParameterError(f"{where} must be {wanted}, got {value!r}")


def _check_str(value: Any, where: str, *, empty: bool = False) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidParameterError(
            f"{where} must be a {'' if empty else 'non-empty '}string, got {value!r}"
        )


def _check_str_list(value: Any, where: str) -> None:
    if not isinstance(value, tuple | list) or not all(
        isinstance(item, str) and item for item in value
    ):
        raise InvalidParameterError(f"{where} must be a list of non-empty strings, got {value!r}")


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InvalidParameterError(
            f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(sorted(allowed))}"
        )


def _check_table(value: Any, where: str, example: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{where} must be a table like {example}, got {value!r}")
    return value


def _check_data(data: DataSpec, where: str) -> None:
    _check_str(data.source, f"{where}.source")
    if data.classes is not None and not (
        isinstance(data.classes, tuple)
        and data.classes
        and all(_is_int(c) or (isinstance(c, str) and c) for c in data.classes)
    ):
        raise InvalidParameterError(
            f"{where}.classes must be a string like '0-4' or a list of class indices or names, "
            f"got {data.classes!r}"
        )
    for key in ("per_class", "limit"):
        if getattr(data, key) is not None:
            _check_int(getattr(data, key), f"{where}.{key}", minimum=1)
    if data.name is not None:
        _check_str(data.name, f"{where}.name")
    if data.group not in GROUPS:
        raise InvalidParameterError(f"{where}.group must be 'near' or 'far', got {data.group!r}")
    _check_int(data.seed, f"{where}.seed")
    if data.test_fraction is not None:
        if not _is_number(data.test_fraction) or not 0 < data.test_fraction < 1:
            raise InvalidParameterError(
                f"{where}: test_fraction must be a number in (0, 1), got {data.test_fraction!r}"
            )
        if data.part not in SPLIT_PARTS:
            raise InvalidParameterError(
                f"{where}: part must be 'train' or 'test' with test_fraction, got {data.part!r}"
            )


def _check_name(name: Any) -> None:
    _check_str(name, "name")
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise InvalidParameterError(
            f"name {name!r} becomes the output folder's name: use letters, digits, spaces and "
            f". _ - only (no '/' or '..'), e.g. 'my-benchmark'"
        )


def _check_prompts(prompts: Any) -> None:
    from oodprobe.encoders.text import PROMPT_SETS

    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise InvalidParameterError(
                f"prompts must be one of {', '.join(PROMPT_SETS)} or a list of prompts with "
                f"'{{}}', got {prompts!r}"
            )
        return
    _check_str_list(prompts, "[id].prompts")
    if not prompts or any("{}" not in prompt for prompt in prompts):
        raise InvalidParameterError(
            f"[id].prompts: each prompt needs a '{{}}' where the class name goes, got {prompts!r}"
        )


def _slug(text: str) -> str:
    """The file-name form of a label (score CSVs, galleries): one home, shared with the runner."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def check_encoders(encoders: Any, where: str) -> None:
    """A list of distinct encoder names that their sources know (nothing is built).

    Two spellings of one encoder (``efficientnet-lite0`` and ``efficientnet-lite0@224``) are
    refused: a study would count the model twice. A ``finetuned:PATH`` must name a finished
    fine-tuning folder (its small metadata file is read, not the model).
    """
    from oodprobe.encoders import parse_encoder_name

    _check_str_list(encoders, where)
    if len(set(encoders)) != len(encoders):
        raise InvalidParameterError(f"{where} must be unique, got {list(encoders)}")
    seen: dict[str, str] = {}
    for encoder in encoders:
        parsed = parse_encoder_name(encoder)  # an unknown source or a bad variant raises here
        if parsed.canonical in seen:
            raise InvalidParameterError(
                f"{where} must be distinct encoders, and {seen[parsed.canonical]!r} and "
                f"{encoder!r} are both {parsed.canonical!r}; list it once"
            )
        seen[parsed.canonical] = encoder
        if parsed.source.prefix == "finetuned":
            from oodprobe.encoders.finetuned import read_finetune_metadata

            read_finetune_metadata(Path(parsed.spec).expanduser(), parsed.spec)
    slugs = [_slug(encoder) for encoder in encoders]
    if len(set(slugs)) != len(slugs):  # score files go to scores/<slug>/
        raise InvalidParameterError(
            f"{where} must differ also as file names (letters, digits, '.', '_', '-'), got "
            f"{list(encoders)}; rename a fine-tuning folder or checkpoint"
        )


def validate(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Check every value of ``spec`` that needs no data or model; return it unchanged.

    Types, ranges, names of encoders, detectors, conventions and prompt sets, each detector's
    parameters (by its class), and uniqueness of labels; the first problem raises one line.
    """
    from oodprobe.metrics import get_convention
    from oodprobe.pipeline import check_detector_specs

    _check_name(spec.name)
    _check_str(spec.description, "description", empty=True)
    _check_str(spec.convention, "convention")
    get_convention(spec.convention)
    if not _is_number(spec.tpr) or not 0 < spec.tpr <= 1:
        raise InvalidParameterError(
            f"tpr must be a number in (0, 1], got {spec.tpr!r}; e.g. tpr = 0.95 for FPR@95"
        )
    _check_int(spec.bootstrap, "bootstrap", minimum=0)
    _check_int(spec.seed, "seed", minimum=0)  # numpy's generators take no negative seed
    _check_int(spec.gallery_size, "gallery_size", minimum=0)
    _check_data(spec.id_train, "[id].train")
    _check_data(spec.id_test, "[id].test")
    if not spec.ood:
        raise InvalidParameterError("the benchmark needs at least one OOD set")
    for index, ood in enumerate(spec.ood):
        _check_data(ood, f"[[ood]] #{index + 1}")
    if not spec.encoders:
        raise InvalidParameterError("the benchmark lists no encoders")
    check_encoders(spec.encoders, "encoders")
    if not isinstance(spec.study, StudySpec):
        raise InvalidParameterError(f"study must be a [study] table, got {spec.study!r}")
    if spec.study.encoders:
        check_encoders(spec.study.encoders, "[study] encoders")
    _check_int(spec.study.bootstrap, "[study] bootstrap", minimum=0)
    if spec.study.bootstrap > MAX_STUDY_BOOTSTRAP:  # the resamples are held in memory at once
        raise InvalidParameterError(
            f"[study] bootstrap must be at most {MAX_STUDY_BOOTSTRAP}, got "
            f"{spec.study.bootstrap}; 1000 is the default"
        )
    if not _is_number(spec.study.confidence) or not 0 < spec.study.confidence < 1:
        raise InvalidParameterError(
            f"[study] confidence must be a number in (0, 1), got {spec.study.confidence!r}; "
            f"e.g. confidence = 0.95"
        )
    if not spec.detectors:
        raise InvalidParameterError("the benchmark lists no detectors")
    for index, detector in enumerate(spec.detectors):
        where = f"[[detectors]] #{index + 1}"
        _check_str(detector.name, f"{where} name")
        _check_table(detector.params, f"{where} params", "{ k = 1 }")
        _check_str(detector.label, f"{where} label", empty=True)
    check_detector_specs(spec.detectors)
    labels = [d.display for d in spec.detectors]
    if len({_slug(label) for label in labels}) != len(labels):
        raise InvalidParameterError(
            f"detector labels must be unique (also as file names), got {labels}; "
            f"give each a distinct 'label'"
        )
    ood_labels = [o.label for o in spec.ood]
    if len(set(ood_labels)) != len(ood_labels):
        raise InvalidParameterError(f"OOD set names must be unique, got {ood_labels}")
    if spec.class_names is not None:
        _check_str_list(spec.class_names, "[id].class_names")
    if spec.mining is not None:
        _check_mining(spec.mining, spec.class_names, spec.detectors)
    _check_prompts(spec.prompts)
    return spec


# --------------------------------------------------------------------------------------------
# TOML → spec: structure here, values in validate()

_DATA_KEYS = {"source", "classes", "per_class", "limit", "name", "group", "seed"}


def _data_spec(table: Any, where: str, base_dir: Path | None, **extra: Any) -> DataSpec:
    if isinstance(table, str):
        table = {"source": table}
    table = _check_table(table, where, '{ source = "folder/" }')
    _check_keys(table, _DATA_KEYS, where)
    source = table.get("source")
    _check_str(source, f"{where}.source")
    source = os.path.expandvars(source)
    if base_dir is not None and (source.startswith(".") or "/" in source):
        candidate = Path(source).expanduser()
        if not candidate.is_absolute():
            source = str((base_dir / candidate).resolve())
    classes = table.get("classes")
    if isinstance(classes, str):
        from oodprobe.data import parse_class_selection

        classes = parse_class_selection(classes)
    if classes is not None and not isinstance(classes, list | tuple):
        raise InvalidParameterError(
            f"{where}.classes must be a string like '0-4' or a list, got {classes!r}"
        )
    return DataSpec(
        source=source,
        classes=tuple(classes) if classes is not None else None,
        per_class=table.get("per_class"),
        limit=table.get("limit"),
        name=table.get("name"),
        group=table.get("group", "far"),
        seed=table.get("seed", 0),
        **extra,
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
    "study",
}
_ID_KEYS = {"train", "test", "images", "test_fraction", "class_names", "prompts", "mine"}


def _id_specs(id_table: Mapping[str, Any], base_dir: Path | None) -> tuple[DataSpec, DataSpec]:
    """``[id]``: ``train`` + ``test``, or ``images`` + ``test_fraction`` (split by oodprobe)."""
    if "images" in id_table or "test_fraction" in id_table:
        if "train" in id_table or "test" in id_table:
            raise InvalidParameterError(
                "[id] takes either 'train' and 'test', or 'images' with 'test_fraction'"
            )
        if "images" not in id_table or "test_fraction" not in id_table:
            raise InvalidParameterError(
                "[id] needs both 'images' (the ID data) and 'test_fraction' (e.g. 0.2) to split it"
            )
        fraction = id_table["test_fraction"]
        return (
            _data_spec(
                id_table["images"], "[id].images", base_dir, test_fraction=fraction, part="train"
            ),
            _data_spec(
                id_table["images"], "[id].images", base_dir, test_fraction=fraction, part="test"
            ),
        )
    for key in ("train", "test"):
        if key not in id_table:
            raise InvalidParameterError(
                f"[id] needs '{key}' (a dataset name or a table), or 'images' with "
                f"'test_fraction' to split one set of images"
            )
    return (
        _data_spec(id_table["train"], "[id].train", base_dir),
        _data_spec(id_table["test"], "[id].test", base_dir),
    )


def _detector_specs(tables: Any) -> tuple[DetectorSpec, ...]:
    if not isinstance(tables, list):
        raise InvalidParameterError(
            f"detectors must be a list of [[detectors]] tables or names, got {tables!r}"
        )
    detectors = []
    for index, table in enumerate(tables):
        where = f"[[detectors]] #{index + 1}"
        if isinstance(table, str):
            detectors.append(parse_detector_option(table))
            continue
        table = _check_table(table, where, '{ name = "knn", params = { k = 1 } }')
        _check_keys(table, {"name", "params", "label"}, where)
        if "name" not in table:
            raise InvalidParameterError(f"{where} needs a 'name'")
        params = _check_table(table.get("params", {}), f"{where} params", "{ k = 1 }")
        detectors.append(DetectorSpec(table["name"], dict(params), table.get("label", "")))
    return tuple(detectors)


def spec_from_dict(config: Mapping[str, Any], base_dir: Path | None = None) -> BenchmarkSpec:
    """Validate a parsed TOML document into a BenchmarkSpec; errors name the offending key."""
    _check_keys(config, _TOP_KEYS, "the benchmark config")
    id_table = config.get("id")
    if not isinstance(id_table, Mapping):
        raise InvalidParameterError("the benchmark config needs an [id] table with train and test")
    _check_keys(id_table, _ID_KEYS, "[id]")
    id_train, id_test = _id_specs(id_table, base_dir)
    ood_tables = config.get("ood")
    if not isinstance(ood_tables, list) or not ood_tables:
        raise InvalidParameterError("the benchmark config needs at least one [[ood]] set")
    encoders = config.get("encoders", ["efficientnet-lite0"])
    if isinstance(encoders, str):
        encoders = [encoders]
    _check_str_list(encoders, "encoders")
    prompts = id_table.get("prompts", "ensemble")
    class_names = id_table.get("class_names")
    if class_names is not None:
        _check_str_list(class_names, "[id].class_names")
    if not isinstance(prompts, str):
        _check_str_list(prompts, "[id].prompts")
    mine = id_table.get("mine")
    mining = None
    if mine is not None:
        if not isinstance(mine, Mapping):
            raise InvalidParameterError(
                f"[id].mine must be a table such as {{ corpus = 'wordnet', clusters = 10 }}, "
                f"got {mine!r}"
            )
        _check_keys(mine, _MINE_KEYS, "[id].mine")
        mining = MiningSpec(**mine)
    spec = BenchmarkSpec(
        name=config.get("name", "benchmark"),
        description=config.get("description", ""),
        id_train=id_train,
        id_test=id_test,
        ood=tuple(_data_spec(t, f"[[ood]] #{i + 1}", base_dir) for i, t in enumerate(ood_tables)),
        encoders=tuple(encoders),
        # no [[detectors]]: the paper's label-free k-NN (what study fits and attack targets);
        # an explicit empty list is still refused
        detectors=_detector_specs(config.get("detectors", [{"name": "knn"}])),
        class_names=tuple(class_names) if class_names is not None else None,
        prompts=prompts if isinstance(prompts, str) else tuple(prompts),
        convention=config.get("convention", "oodprobe"),
        tpr=config.get("tpr", 0.95),
        bootstrap=config.get("bootstrap", 200),
        seed=config.get("seed", 0),
        gallery_size=config.get("gallery_size", 12),
        study=_study_spec(config.get("study", {})),
        mining=mining,
    )
    return validate(spec)


_STUDY_KEYS = {"encoders", "bootstrap", "confidence"}


def _study_spec(table: Any) -> StudySpec:
    study = _check_table(table, "[study]", 'encoders = ["efficientnet-lite0", ...]')
    _check_keys(study, _STUDY_KEYS, "[study]")
    encoders = study.get("encoders", [])
    if isinstance(encoders, str):
        encoders = [encoders]
    _check_str_list(encoders, "[study] encoders")
    return StudySpec(
        encoders=tuple(encoders),
        bootstrap=study.get("bootstrap", 1000),
        confidence=study.get("confidence", 0.95),
    )


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
