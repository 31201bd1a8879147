"""The ``oodprobe`` command line: a thin shell over the library.

Each command parses options, calls one library function and prints. User-fixable problems
(:class:`oodprobe.errors.OodprobeError`) are printed in one line with exit code 1; anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from oodprobe.errors import DataError, InvalidParameterError, OodprobeError

app = typer.Typer(
    name="oodprobe",
    help="Out-of-distribution detection with frozen features of pretrained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Choices shown in --help. Building the app (as `oodprobe --help` does) must not import torch or
# scikit-learn, so the names of heavy modules are spelled here and a test keeps them equal to
# the library's (oodprobe.features.Precision/OnError, metrics.CONVENTIONS, text.PROMPT_SETS);
# the presets come from their light registry.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ON_ERROR = ("skip", "raise")
CONVENTION_NAMES = (
    "oodprobe",
    "openood",
    "openood-v1",
    "pytorch-ood",
    "mcm",
    "plp",
    "clipn",
    "deep-knn",
)
PROMPT_SET_NAMES = ("ensemble", "single", "clipn")
ENGINES = ("local", "ray")  # oodprobe.features.ENGINES
STORE_DTYPES = ("float32", "float16", "bfloat16")  # oodprobe.features.STORE_DTYPES
if TYPE_CHECKING:
    Precision = str
    OnError = str
    Engine = str
    StoreDtype = str
    ConventionName = str
    PresetName = str
    PromptSetName = str
else:
    from oodprobe.benchmark_spec import benchmark_names

    Precision = Literal[PRECISIONS]
    OnError = Literal[ON_ERROR]
    Engine = Literal[ENGINES]
    StoreDtype = Literal[STORE_DTYPES]
    ConventionName = Literal[CONVENTION_NAMES]
    PresetName = Literal[tuple(benchmark_names())]
    PromptSetName = Literal[PROMPT_SET_NAMES]

SKIPPED_SHOWN = 5
"""How many skipped images fit/score/bench list by path (extract lists more, and has --json)."""
DEVICE_CHOICES = "[auto|cpu|cuda|cuda:N|mps]"


def _check_device(device: str) -> str:
    """``--device``: refused while the options are parsed (before any work) if malformed or
    absent from this machine."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", device):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    from oodprobe.pipeline import check_device

    return check_device(device)


DeviceOption = Annotated[
    str,
    typer.Option(
        metavar=DEVICE_CHOICES,
        callback=_check_device,
        help="Where the encoder runs (auto: cuda, else mps, else cpu)",
    ),
]
PrecisionOption = Annotated[Precision, typer.Option(help="Encoder precision (auto: fp16 on a GPU)")]


def _check_memory_budget(value: str | None) -> str | None:
    """``--memory-budget``: a malformed size is refused while the options are parsed."""
    from oodprobe.arrays import parse_memory_budget
    from oodprobe.errors import OodprobeError

    try:
        parse_memory_budget(value, name="--memory-budget")
    except OodprobeError as error:
        raise typer.BadParameter(str(error)) from None
    return value


MemoryBudgetOption = Annotated[
    str | None,
    typer.Option(
        callback=_check_memory_budget,
        metavar="SIZE",
        help="Peak working memory of fitting and scoring, e.g. 4GiB or 512MB (default: no "
        "limit); block sizes follow it and k-NN keeps a large ID set on disk",
    ),
]


def _check_engine(engine: str) -> str:
    """``--engine``: ray without Ray installed is refused while the options are parsed."""
    if engine == "ray":
        from oodprobe.ray_engine import require_ray  # light: imports Ray only to check it

        require_ray()
    return engine


EngineOption = Annotated[
    Engine,
    typer.Option(
        callback=_check_engine,
        help="Where features are extracted: local (this machine, decoding worker processes) "
        "or ray (Ray Data: decoding tasks and encoder actors, one per GPU, on a local Ray or the "
        "cluster at --ray-address; pip install 'oodprobe\\[ray]')",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        help="Ray cluster for --engine ray, e.g. ray://head:10001 or auto (default: "
        "$RAY_ADDRESS; unset: a local Ray on this machine's cores)",
    ),
]
StoreDtypeOption = Annotated[
    StoreDtype,
    typer.Option(
        help="Dtype the feature cache stores features in (float16, bfloat16: half the disk "
        "and memory; part of the cache key)"
    ),
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per forward pass")]
WorkersOption = Annotated[
    int | None,
    typer.Option(min=0, help="Image-decoding worker processes (default: spare cores; 0: none)"),
]
PromptsOption = Annotated[
    PromptSetName | None,
    typer.Option(
        help="Prompt set for text detectors (bench default: the config's; else ensemble)",
    ),
]
ClassNamesOption = Annotated[
    str | None,
    typer.Option(
        help="Class names for text detectors, in label order: a file with one name per line, "
        "or a comma-separated list (default: the dataset's names)"
    ),
]
DownloadOption = Annotated[
    bool, typer.Option(help="Allow downloading a built-in dataset that is not on disk")
]
CacheDirOption = Annotated[
    Path | None, typer.Option(help="Feature cache root (default $OODPROBE_CACHE or ~/.cache)")
]
OutputFolderOption = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder")]
ConventionOption = Annotated[
    ConventionName | None, typer.Option(help="Metric convention (default: the config's)")
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        help="File holding a secret key: the detector file gets (fit) or must carry (score) a "
        "matching HMAC-SHA256 tamper-evidence tag; default: $OODPROBE_DETECTOR_KEY if set"
    ),
]


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # piped or redirected: rich would assume 80 columns and fold the results table
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


def _print_skipped(
    console: Any,
    skipped: Sequence[Any],
    where: str = "",
    shown: int = SKIPPED_SHOWN,
    more: str = "",
) -> None:
    """``skipped N undecodable image(s) [and M path(s) …][ of WHERE]:``, then the first few."""
    from rich.markup import escape

    if not skipped:
        return
    of = f" of {escape(where)}" if where else ""
    # index -1: what the folder walk left out (link loops, dangling links, duplicates)
    walked = sum(1 for item in skipped if getattr(item, "index", 0) < 0)
    parts = [f"{len(skipped) - walked} undecodable image(s)"] if len(skipped) > walked else []
    if walked:
        parts.append(f"{walked} path(s) left out by the folder walk")
    console.print(f"[yellow]skipped {' and '.join(parts)}{of}:[/]")
    for item in skipped[:shown]:
        # soft_wrap: a long path stays on one line when piped; escape: '[...]' in a file name
        console.print(f"  {escape(item.source)}: {escape(item.reason)}", soft_wrap=True)
    if len(skipped) > shown:
        console.print(f"  … and {len(skipped) - shown} more{more}", soft_wrap=True)


def _check_output_file(path: Path, example: str) -> None:
    """Refuse an output that is a folder before any work (the command writes one file)."""
    if path.is_dir():
        raise InvalidParameterError(
            f"--output {path} is a directory; give a file path, e.g. {path / example}"
        )


def _class_names(value: str | None) -> list[str] | None:
    """``--class-names``: an existing file holds one name per line; otherwise a comma list."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidParameterError(f"cannot read --class-names {path}: {error}") from None
        names = [line.strip() for line in lines if line.strip()]
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise InvalidParameterError(
            f"--class-names {value!r} holds no names; give a comma-separated list or a file "
            "with one name per line"
        )
    return names


def _read_key(path: Path | None) -> bytes | None:
    """The secret of ``--key-file`` (trailing newline dropped); None: the library's default."""
    if path is None:
        return None
    try:
        key = path.read_bytes().rstrip(b"\r\n")
    except OSError as error:
        raise InvalidParameterError(
            f"cannot read --key-file {path}: {error.strerror or error}"
        ) from None
    if not key:
        raise InvalidParameterError(
            f"--key-file {path} is empty; write a secret into it, e.g. "
            f"'openssl rand -hex 32 > {path}'"
        )
    return key


@app.command()
def extract(
    source: Annotated[
        str, typer.Argument(help="Built-in dataset (NAME or NAME:SPLIT), image folder or .txt list")
    ],
    encoder: Annotated[str, typer.Option("--encoder", "-e", help="Encoder name")] = (
        "efficientnet-lite0"
    ),
    classes: Annotated[
        str | None, typer.Option(help="Keep these classes, e.g. '0-4' or '0,3,cat'")
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Seeded subsample of this many images per class")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Keep only the first N images")] = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    cache_dir: CacheDirOption = None,
    on_error: Annotated[
        OnError, typer.Option(help="Undecodable images: skip (and list them) or raise")
    ] = "skip",
    download: DownloadOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary")] = False,
    store_dtype: StoreDtypeOption = "float32",
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
) -> None:
    """Extract features of SOURCE with an encoder (cached; a rerun reads the cache)."""
    from oodprobe.data import create_dataset, parse_class_selection
    from oodprobe.features import extract_features

    dataset = create_dataset(
        source,
        classes=parse_class_selection(classes) if classes else None,
        per_class=per_class,
        limit=limit,
        download=download,
    )
    result = extract_features(
        dataset,
        encoder,
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        cache_root=cache_dir,
        on_error=on_error,  # type: ignore[arg-type]
        progress=not as_json,
        store_dtype=store_dtype,  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        ray_address=ray_address,
    )
    summary = {
        "dataset": result.dataset_name,
        "encoder": result.encoder_name,
        "path": str(result.path),
        "arrays": {name: list(array.shape) for name, array in result.arrays.items()},
        "n_images": len(dataset),
        "n_skipped": len(result.skipped),
        "skipped": [vars(item) for item in result.skipped],
        "labels": result.labels is not None,
        "from_cache": result.from_cache,
        **result.stats,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    console = _console()
    shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in result.arrays.items())
    origin = (
        "read from cache"
        if result.from_cache
        else (f"extracted at {result.stats['images_per_second']:.1f} images/s")
    )
    console.print(f"[bold]{result.dataset_name}[/] · {result.encoder_name}: {shapes} ({origin})")
    paths = [result.path] if result.path else [part["path"] for part in result.stats["parts"]]
    for path in paths:  # a concatenation's arrays live in its parts' entries
        how = (
            "bfloat16 stored as uint16 bits: np.load(...).view(ml_dtypes.bfloat16), "
            "or oodprobe.load_features"
            if store_dtype == "bfloat16"
            else "plain .npy files; np.load works"
        )
        console.print(f"features: {path}  ({how})")
    _print_skipped(console, result.skipped, shown=20, more=" (see --json)")


@app.command()
def models(
    source: Annotated[
        str | None, typer.Option(help="List every model of one source: openclip, timm")
    ] = None,
) -> None:
    """List the encoders oodprobe can build (and which run offline)."""
    from rich.table import Table

    from oodprobe.encoders import ENCODERS

    console = _console()
    if source == "openclip":
        import open_clip

        for arch, tag in open_clip.list_pretrained():
            typer.echo(f"openclip:{arch}/{tag}")
        return
    if source == "timm":
        import timm

        for name in timm.list_pretrained():
            typer.echo(f"timm:{name}")
        return
    if source is not None:
        raise OodprobeError(f"--source must be 'openclip' or 'timm', got {source!r}")
    table = Table(title="encoders")
    for column in ("name", "offline", "examples", "what"):
        table.add_column(column)
    for entry in ENCODERS.values():
        table.add_row(
            entry.pattern,
            "yes" if entry.offline else "after download",
            "\n".join(entry.examples),
            entry.description,
        )
    console.print(table)


@app.command()
def datasets() -> None:
    """List the built-in datasets, their splits, and whether they are on this machine."""
    from rich.table import Table

    from oodprobe.data import list_datasets

    table = Table(title="built-in datasets (or pass an image folder / .txt list of paths)")
    for column in ("name", "splits", "classes", "available", "what"):
        table.add_column(column)
    for info in list_datasets():
        table.add_row(
            info.name,
            ", ".join(info.splits),
            str(info.n_classes),
            "yes" if info.is_available() else "no",
            info.description,
        )
    _console().print(table)


def _format_default(value: Any) -> str:
    """A default as the user would type it after ``NAME:key=`` (TOML scalars)."""
    if value is None or value is inspect.Parameter.empty:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):  # the TOML array a user types: ["knn","gaussian"]
        return "[" + ",".join(json.dumps(item) for item in value) + "]"
    return str(value)


@app.command()
def detectors() -> None:
    """List the detectors: what each needs, its parameters with defaults, and the presets."""
    from oodprobe.benchmark_spec import DetectorSpec, benchmark_names
    from oodprobe.detectors import DETECTORS
    from oodprobe.pipeline import head_sources, needs_labels, needs_text

    # Plain indented text, not a table: nothing folds when piped, and grep finds a parameter.
    lines = ["detectors (use as --detector NAME or NAME:key=value,…; TOML: params = {…})", ""]
    for name, cls in DETECTORS.items():
        labels = "clean/attacked labels" if cls.fit_labels != "classes" else "labels"
        default = DetectorSpec(name)  # what it needs with its default parameters
        heads = head_sources(default)
        needs = [
            need
            for need, required in (
                (labels, needs_labels(default)),
                ("text", needs_text([default])),
                (f"a classifier head ({', '.join(heads)})", bool(heads)),
            )
            if required
        ]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name}: {summary}" if summary else name)
        scores = cls.input_array_for({})
        lines.append(f"    needs: {', '.join(needs) or 'nothing'}; scores: {scores}")
        params = cls.param_info()
        if not params:
            lines.append("    no parameters")
        width = max((len(f"{p.name}={_format_default(p.default)}") for p in params), default=0)
        for info in params:
            setting = f"{info.name}={_format_default(info.default)}"
            lines.append(f"    {setting:<{width}}  {info.allowed}".rstrip())
        lines.append("")
    lines.append(
        f"benchmark presets (oodprobe bench --preset NAME): {', '.join(benchmark_names())}"
    )
    typer.echo("\n".join(lines))


def _print_results(run: Any, console: Any) -> None:
    """Per encoder a detectors x OOD sets grid; then failed detectors and ID accuracies."""
    from rich.markup import escape
    from rich.table import Table

    from oodprobe.report.tables import build_tables, format_ci, format_percent, fpr_label

    records = run.records
    convention = records[0]["convention"] if records else run.spec.convention
    positive = records[0]["fpr_positive"].upper() if records else "ID"
    fpr_name = fpr_label(run.spec.tpr)
    for table in build_tables(records):
        grid = Table(
            title=f"{escape(table.encoder)}: AUROC / {fpr_name} / AUPR-In in % "
            f"(convention '{convention}': {positive} positive; AUROC CI = bootstrap 95%)"
        )
        grid.add_column("detector", no_wrap=True)
        for column in table.columns:
            group = table.groups[column]
            title = escape(column) if group == "mean" else f"{escape(column)}\n({group})"
            grid.add_column(title, justify="right")
        for detector in table.detectors:
            cells = []
            for column in table.columns:
                auroc = table.cells[detector].get((column, "auroc"))
                text = " / ".join(
                    format_percent(cell.value if cell else None)
                    for cell in (
                        table.cells[detector].get((column, metric))
                        for metric in ("auroc", "fpr", "aupr_in")
                    )
                )
                if auroc and auroc.best:
                    text = f"[bold green]{text}[/]"
                ci = format_ci(auroc.low, auroc.high) if auroc else ""
                cells.append(f"{text}\n[dim]{ci}[/]" if ci else text)
            grid.add_row(escape(detector), *cells)
        console.print(grid)
    failed: dict[tuple[str, str], str] = {}
    for record in records:
        if record.get("error"):
            failed.setdefault((record["encoder"], record["detector"]), record["error"])
    for (encoder, detector), error in failed.items():
        console.print(
            f"[red]{escape(detector)} on {escape(encoder)} failed:[/] {escape(error)}",
            soft_wrap=True,
        )
    for entry in run.id_accuracy:
        console.print(
            f"ID accuracy ({entry['encoder']}, {entry['method']}): {100 * entry['accuracy']:.1f}%"
        )


def _load_spec(config: Path | None, preset: str | None, prompts: str | None) -> Any:
    """The benchmark spec of a CONFIG file or a preset (exactly one), with other prompts."""
    from dataclasses import replace

    from oodprobe.benchmark_spec import create_benchmark, load_benchmark, validate

    if config is not None and preset is not None:
        raise InvalidParameterError("give either a CONFIG file or --preset, not both")
    if config is None and preset is None:
        raise InvalidParameterError("give a benchmark CONFIG file or --preset NAME")
    spec = load_benchmark(config) if config is not None else create_benchmark(str(preset))
    return spec if prompts is None else validate(replace(spec, prompts=prompts))


def _preset_data_error(error: DataError, spec: Any) -> DataError:
    """A preset's data lives where the preset looks: its data errors say where that is."""
    return DataError(f"{error} (preset {spec.name}: {spec.description})")


def _log_line(console: Any) -> Callable[[str], None]:
    """A runner's ``log``: each message a dim console line, printed as plain text."""

    def log(message: str) -> None:
        # markup off: "[encoder]" and "digits:train:" are text, not rich tags or emoji
        console.print(message, style="dim", markup=False, emoji=False)

    return log


def _run_spec(
    runner: Any,
    spec: Any,
    config: Path | None,
    output_dir: Path,
    console: Any,
    header: str,
    **options: Any,
) -> Any:
    """``runner(spec, output_dir, **options)`` (bench, study, attack), its log on the console.

    ``header`` is printed with the run's first log line: runners log only once their checks
    have passed, so a refused input stays one ``error:`` line. A preset's data errors say where
    the preset looks for its data.
    """
    pending = [header]
    write = _log_line(console)

    def log(message: str) -> None:
        if pending:
            console.print(pending.pop())
        write(message)

    try:
        return runner(spec, output_dir, log=log, **options)
    except DataError as error:
        if config is not None:
            raise
        raise _preset_data_error(error, spec) from error


def _print_finish(run: Any, console: Any) -> None:
    """The images each set left out, and how long the run took."""
    for label, skipped in run.skipped.items():
        _print_skipped(console, skipped, where=label)
    console.print(f"finished in {run.seconds:.0f} s")


@app.command()
def bench(
    config: Annotated[
        Path | None, typer.Argument(help="Benchmark TOML file (default: the offline preset)")
    ] = None,
    preset: Annotated[PresetName | None, typer.Option(help="Built-in preset")] = None,
    encoder: Annotated[
        list[str] | None, typer.Option("--encoder", "-e", help="Encoder(s) replacing the config's")
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option("--detector", "-d", help="Detector(s) replacing the config's: NAME[:k=v,…]"),
    ] = None,
    output: OutputFolderOption = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(min=0, help="Bootstrap resamples for confidence intervals (0: none)"),
    ] = None,
    convention: ConventionOption = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the bootstrap resampling (default: the config's); data tables and "
            "probes keep their own seed (per_class seed, -d plp:seed=N)"
        ),
    ] = None,
    prompts: PromptsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    cache_dir: CacheDirOption = None,
    download: DownloadOption = False,
    store_dtype: StoreDtypeOption = "float32",
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    memory_budget: MemoryBudgetOption = None,
) -> None:
    """Run a benchmark (no arguments: the built-in offline default) and write a report."""
    from oodprobe.benchmark import run_benchmark
    from oodprobe.presets import DEFAULT_BENCHMARK

    spec = _load_spec(
        config, preset or (None if config else DEFAULT_BENCHMARK), prompts
    ).with_overrides(
        encoders=encoder, detectors=detector, seed=seed, bootstrap=bootstrap, convention=convention
    )
    console = _console()
    output_dir = output or Path("oodprobe-results") / spec.name
    run = _run_spec(
        run_benchmark,
        spec,
        config,
        output_dir,
        console,
        f"[bold]benchmark {spec.name}[/]: {len(spec.encoders)} encoder(s), "
        f"{len(spec.detectors)} detector(s), {len(spec.ood)} OOD set(s)",
        cache_root=cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        download=download,
        store_dtype=store_dtype,
        engine=engine,
        ray_address=ray_address,
        memory_budget=memory_budget,
    )
    _print_results(run, console)
    _print_finish(run, console)
    console.print(f"results: {run.files['json']}  {run.files['csv']}")
    console.print(f"report:  [bold]{run.files['report']}[/]")


@app.command()
def study(
    config: Annotated[
        Path | None,
        typer.Argument(help="Benchmark TOML file, optionally with a [study] table"),
    ] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Built-in preset (default: offline-study)")
    ] = None,
    encoder: Annotated[
        list[str] | None,
        typer.Option(
            "--encoder",
            "-e",
            help="Encoders to compare (at least two; default: [study] encoders, else the "
            "config's), e.g. -e efficientnet-lite0 -e efficientnet-lite0/block10",
        ),
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option(
            "--detector",
            "-d",
            help="Detector(s) replacing the config's: NAME[:k=v,…] (the label-free knn is "
            "always added)",
        ),
    ] = None,
    output: OutputFolderOption = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(min=0, help="Bootstrap resamples of the models for the fits' intervals"),
    ] = None,
    convention: ConventionOption = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the bootstrap resampling (default: the config's)")
    ] = None,
    prompts: PromptsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    cache_dir: CacheDirOption = None,
    download: DownloadOption = False,
    store_dtype: StoreDtypeOption = "float32",
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    memory_budget: MemoryBudgetOption = None,
) -> None:
    """Compare encoders on one benchmark: ID accuracy vs OOD AUROC, fits, ranking, report."""
    from dataclasses import replace

    from oodprobe.benchmark_spec import validate
    from oodprobe.presets import DEFAULT_STUDY
    from oodprobe.study import run_study, study_spec

    spec = _load_spec(config, preset or (None if config else DEFAULT_STUDY), prompts)
    spec = spec.with_overrides(detectors=detector, seed=seed, convention=convention)
    if bootstrap is not None:
        spec = validate(replace(spec, study=replace(spec.study, bootstrap=bootstrap)))
    spec = study_spec(spec, encoder)  # every check before any work
    console = _console()
    folder = spec.name if "study" in spec.name else f"{spec.name}-study"
    output_dir = output or Path("oodprobe-results") / folder
    result = _run_spec(
        run_study,
        spec,
        config,
        output_dir,
        console,
        f"[bold]study {spec.name}[/]: {len(spec.encoders)} encoders, "
        f"{len(spec.detectors)} detector(s), {len(spec.ood)} OOD set(s)",
        cache_root=cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        download=download,
        store_dtype=store_dtype,
        engine=engine,
        ray_address=ray_address,
        memory_budget=memory_budget,
    )
    _print_study(result.study, console)
    _print_finish(result.run, console)
    console.print(f"study:   {result.files['study_json']}  {result.files['study_csv']}")
    console.print(f"report:  [bold]{result.files['report']}[/]")


def _number(value: Any, digits: int = 2) -> str:
    """A table cell: the number with ``digits`` decimals, or a dash when there is none."""
    return "—" if value is None else f"{value:.{digits}f}"


def _print_study(study: dict[str, Any], console: Any) -> None:
    """The ranking of the models, then the fits of the label-free k-NN's AUROC on accuracy."""
    from rich.markup import escape
    from rich.table import Table

    from oodprobe.report.tables import format_percent

    def interval(values: Any, digits: int = 2) -> str:
        return "" if not values else f" [dim][{values[0]:.{digits}f}, {values[1]:.{digits}f}][/]"

    primary = study["primary_detector"]
    ranking = Table(title=f"models ranked by {escape(study['ranking_by'])}")
    for column in ("rank", "encoder", "k-NN acc %", "probe acc %", f"{primary} AUROC %"):
        ranking.add_column(escape(column), justify="left" if column == "encoder" else "right")
    for entry in study["ranking"]:
        ranking.add_row(
            str(entry["rank"]),
            escape(entry["encoder"]),
            format_percent(entry["knn_accuracy"]),
            format_percent(entry["probe_accuracy"]),
            format_percent(entry["primary_auroc"]),
        )
    console.print(ranking)
    fits = Table(
        title=f"AUROC of {escape(primary)} vs {escape(study['accuracy_method'])} across models "
        f"(least squares; {100 * study['confidence']:.0f}% bootstrap intervals over models)"
    )
    for column in ("OOD target", "n", "slope", "R²", "Pearson r", "Spearman ρ"):
        fits.add_column(column, justify="left" if column == "OOD target" else "right")
    for fit in study["fits"]:
        if fit["detector"] != primary or fit["accuracy"] != "knn":
            continue
        fits.add_row(
            escape(fit["target"]),
            str(fit["n_models"]),
            _number(fit["slope"]) + interval(fit["slope_ci"]),
            _number(fit["r2"]) + interval(fit["r2_ci"]),
            _number(fit["pearson"]) + interval(fit["pearson_ci"]),
            _number(fit["spearman"]) + interval(fit["spearman_ci"]),
        )
    console.print(fits)
    for entry in study["lp_vs_ft"]:
        console.print(
            f"LP vs FT ({escape(entry['base'])} → {escape(entry['finetuned'])}, "
            f"{escape(entry['detector'])}): accuracy {format_percent(entry['lp_accuracy'])} vs "
            f"{format_percent(entry['ft_accuracy'])}, mean AUROC "
            f"{format_percent(entry['lp_auroc'])} vs {format_percent(entry['ft_auroc'])}"
        )


ATTACK_METHODS = ("pgd", "feature-matching")
ATTACK_NORMS = ("linf", "l2")
ATTACK_TARGETS = ("random", "nearest")
ATTACK_SMOOTHNESS = ("smooth", "patchy")
if TYPE_CHECKING:
    AttackMethod = str
    AttackNorm = str
    AttackTargets = str
    AttackSmoothness = str
else:
    AttackMethod = Literal[ATTACK_METHODS]
    AttackNorm = Literal[ATTACK_NORMS]
    AttackTargets = Literal[ATTACK_TARGETS]
    AttackSmoothness = Literal[ATTACK_SMOOTHNESS]


@app.command()
def attack(
    config: Annotated[
        Path | None,
        typer.Argument(help="Benchmark TOML file (default: the offline preset)"),
    ] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Built-in preset (default: offline-default)")
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option("--encoder", "-e", help="Encoder to attack (default: the config's first)"),
    ] = None,
    method: Annotated[
        AttackMethod,
        typer.Option(
            help="pgd: PGD on the detector's own score; feature-matching: the paper's attack"
        ),
    ] = "pgd",
    detector: Annotated[
        str | None,
        typer.Option(
            "--detector", "-d", help="Detector to fit and attack: NAME[:k=v,…] (default: knn)"
        ),
    ] = None,
    eps: Annotated[
        list[str] | None,
        typer.Option(help="PGD budget(s), e.g. --eps 4/255 --eps 8/255 (default: 4/255 and 8/255)"),
    ] = None,
    norm: Annotated[AttackNorm, typer.Option(help="PGD norm ball")] = "linf",
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Attack steps (default: 40 for pgd, 250 for feature-matching)"),
    ] = None,
    step_size: Annotated[float | None, typer.Option(help="PGD step size (default: eps/16)")] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate of feature-matching")] = 1e-3,
    n: Annotated[int, typer.Option("--n", min=1, help="OOD images to attack (the first N)")] = 32,
    ood: Annotated[
        str | None, typer.Option(help="OOD set to attack, by name (default: the config's first)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images attacked per batch")] = 16,
    targets: Annotated[
        AttackTargets, typer.Option(help="Feature-matching targets: ID training images")
    ] = "random",
    smoothness: Annotated[
        AttackSmoothness,
        typer.Option(help="Feature-matching penalty: smooth (λ = 5e3) or patchy (λ = 0)"),
    ] = "smooth",
    deployment: Annotated[
        Path | None,
        typer.Option(
            help="Detector file from 'oodprobe fit': attack it; success rate at its threshold"
        ),
    ] = None,
    output: OutputFolderOption = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random starts and targets")] = 0,
    force: Annotated[
        bool, typer.Option(help="Start over in an output folder holding another attack run")
    ] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: WorkersOption = None,
    cache_dir: CacheDirOption = None,
    download: DownloadOption = False,
) -> None:
    """Attack OOD images until a detector takes them for ID; AUROC clean vs attacked per eps."""
    from oodprobe.attack_run import parse_eps, run_attack
    from oodprobe.presets import DEFAULT_BENCHMARK

    spec = _load_spec(config, preset or (None if config else DEFAULT_BENCHMARK), None)
    budgets = [parse_eps(value) for value in (eps or ["4/255", "8/255"])]
    console = _console()
    output_dir = output or Path("oodprobe-results") / f"{spec.name}-attack-{method}"
    run = _run_spec(
        run_attack,
        spec,
        config,
        output_dir,
        console,
        f"[bold]attack {spec.name}[/]: {method}, {n} image(s), output {output_dir}",
        method=method,
        detector=detector,
        encoder=encoder,
        eps=budgets,
        norm=norm,
        steps=steps,
        step_size=step_size,
        lr=lr,
        n=n,
        ood=ood,
        batch_size=batch_size,
        targets=targets,
        smoothness=smoothness,
        seed=seed,
        deployment=deployment,
        force=force,
        cache_root=cache_dir,
        device=device,
        precision=precision,
        num_workers=workers,
        download=download,
        progress=True,
    )
    _print_attack(run.summary, console)
    console.print(f"finished in {run.seconds:.0f} s ({run.batches_resumed} batch(es) resumed)")
    console.print(f"results: {run.files['json']}  images: {run.files['batches']}")
    console.print(f"report:  [bold]{run.files['report']}[/]")


@app.command("attack-svm")
def attack_svm(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Finished 'oodprobe attack' folders over the same images"),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for svm_transfer.json (default: none)"),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Class-score SVM fitted on each attack, AUROC on each other (across budgets and kinds)."""
    from rich.markup import escape
    from rich.table import Table

    from oodprobe.attack_run import class_score_svm_transfer
    from oodprobe.report.tables import format_percent

    console = _console()
    result = class_score_svm_transfer(runs, output, device=device, log=_log_line(console))
    names = result["attacks"]
    table = Table(
        title=f"class-score SVM AUROC in % on held-out images ({escape(result['encoder'])}, "
        f"{escape(result['ood_set'])}, {result['n']} images): fitted on the row, tested on "
        f"the column"
    )
    table.add_column("fitted on ↓, tested on →")
    for name in names:
        table.add_column(escape(name), justify="right")
    auroc = {(cell["fit"], cell["test"]): cell["auroc"] for cell in result["cells"]}
    for fit in names:
        table.add_row(escape(fit), *(format_percent(auroc[(fit, test)]) for test in names))
    console.print(table)
    if "file" in result:
        console.print(f"results: {result['file']}")


def _print_attack(summary: dict[str, Any], console: Any) -> None:
    """Per attack (budget): AUROC and FPR clean vs attacked, success rate, perturbation size."""
    from rich.markup import escape
    from rich.table import Table

    from oodprobe.report.tables import format_percent

    params = summary["params"]
    table = Table(
        title=f"{escape(params['method'])} on {escape(params['detector']['label'])} "
        f"({escape(params['encoder'])}, {escape(params['ood_set'])}, {params['n']} images): "
        f"AUROC / FPR in %, ID test vs clean and attacked OOD (saved PNGs)"
    )
    fpr = f"FPR@{round(100 * params['tpr'], 6):g}"
    for column in (
        "eps",
        "clean AUROC",
        "attacked AUROC",
        f"clean {fpr}",
        f"attacked {fpr}",
        "success %",
        "L∞·255",
        "PSNR dB",
        "SSIM",
        "targets removed AUROC",
        "SVM AUROC",
    ):
        table.add_column(column, justify="right")
    for entry in summary["results"]:
        sizes = entry["perturbation_mean"]
        removed = entry["removed_targets"]
        svm = entry["class_score_svm"]
        eps_text = "—" if entry["eps"] is None else f"{entry['eps_255']:.3g}/255"
        linf = sizes["linf"]
        table.add_row(
            eps_text,
            format_percent(entry["clean_auroc"]),
            format_percent(entry["attacked_auroc"]),
            format_percent(entry["clean_fpr"]),
            format_percent(entry["attacked_fpr"]),
            format_percent(entry["success_rate"]),
            _number(None if linf is None else linf * 255, 2),
            _number(sizes["psnr"], 1),
            _number(sizes["ssim"], 3),
            "—" if removed is None else format_percent(removed["attacked"]["auroc"]),
            "—" if not svm or "auroc" not in svm else format_percent(svm["auroc"]),
        )
    console.print(table)
    console.print(
        f"success: rejected clean and accepted attacked at threshold "
        f"{summary['threshold']['value']:.6g} ({escape(summary['threshold']['source'])})",
        soft_wrap=True,
    )
    for cell in summary["class_score_svm_across_budgets"]:
        if cell["fit_eps"] != cell["test_eps"]:
            console.print(
                f"class-score SVM fitted at eps {255 * cell['fit_eps']:.3g}/255, tested at "
                f"{255 * cell['test_eps']:.3g}/255: AUROC {format_percent(cell['auroc'])}"
            )
    for timing in summary["timing"]["attacks"]:
        console.print(
            f"{escape(timing['attack'])}: {timing['seconds']:.1f} s, "
            f"{timing['seconds_per_image_step']:.4f} s per image per step"
        )


@app.command()
def finetune(
    config: Annotated[
        Path | None,
        typer.Argument(help="Benchmark TOML file whose ID train set is used (or --preset)"),
    ] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Built-in preset (default: offline-default)")
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option(
            "--encoder", "-e", help="Encoder to fine-tune (default: the config's, if it has one)"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for the model and checkpoints (required)"),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per optimiser step")] = 64,
    lr: Annotated[
        float, typer.Option(help="Effective learning rate of AdamW (no scaling)")
    ] = 2.5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW decoupled weight decay")] = 0.05,
    warmup_epochs: Annotated[
        float, typer.Option(help="Linear warm-up (epochs, may be a fraction), then cosine")
    ] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing")] = 0.1,
    mixup: Annotated[float, typer.Option(help="Mixup alpha (0: off; the paper: 0.8)")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="CutMix alpha (0: off; the paper: 1.0)")] = 0.0,
    randaugment: Annotated[
        bool, typer.Option(help="RandAugment (2 ops, magnitude 9) on the training images")
    ] = False,
    ema_decay: Annotated[
        float, typer.Option(help="EMA of the weights, saved instead of them (0: off)")
    ] = 0.9998,
    freeze_blocks: Annotated[
        int, typer.Option(min=0, help="Freeze the stem and the first N blocks (0: none)")
    ] = 0,
    precision: Annotated[
        Precision, typer.Option(help="Training autocast precision (auto: fp16 on a GPU)")
    ] = "auto",
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the head, data order, augmentation")
    ] = 0,
    device: DeviceOption = "auto",
    workers: WorkersOption = None,
    download: DownloadOption = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace a finished model, or a checkpoint of another run, in the output folder"
        ),
    ] = False,
) -> None:
    """Fine-tune an encoder's image tower with a linear head on a benchmark's ID train set.

    Checkpoints every epoch; rerun the same command to resume after an interruption.
    """
    from oodprobe.finetune import FinetuneRecipe
    from oodprobe.finetune import finetune as run_finetune
    from oodprobe.presets import DEFAULT_BENCHMARK

    if output is None:
        raise InvalidParameterError("give the output folder with --output/-o, e.g. -o ft-lite0")
    spec = _load_spec(config, preset or (None if config else DEFAULT_BENCHMARK), None)
    if encoder is None:
        if len(spec.encoders) != 1:
            raise InvalidParameterError(
                f"benchmark {spec.name!r} names {len(spec.encoders)} encoders; pick one with -e"
            )
        encoder = spec.encoders[0]
    recipe = FinetuneRecipe(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        mixup=mixup,
        cutmix=cutmix,
        randaugment=randaugment,
        ema_decay=ema_decay,
        freeze_blocks=freeze_blocks,
        precision=precision,
        seed=seed,
    )
    console = _console()
    try:
        train = spec.id_train.create(download)  # with test_fraction: the train part only
    except DataError as error:
        if config is not None:
            raise
        raise _preset_data_error(error, spec) from error
    console.print(f"[bold]fine-tuning {encoder}[/] on {len(train)} images of {spec.id_train.label}")
    result = run_finetune(
        encoder,
        train,
        output,
        recipe=recipe,
        device=device,
        num_workers=workers,
        force=force,
        log=lambda message: console.print(message, style="dim", markup=False, emoji=False),
    )
    _print_skipped(console, result.skipped, where=spec.id_train.label)
    console.print(
        f"trained {result.epochs_done} epochs in {result.seconds:.0f} s "
        f"({result.images_per_second:.1f} images/s); saved the "
        f"{'EMA' if result.ema else 'trained'} weights: {result.model_path}",
        soft_wrap=True,
    )
    console.print(f"use it as the encoder [bold]{result.encoder_name}[/]", soft_wrap=True)


@app.command()
def fit(
    source: Annotated[str, typer.Argument(help="ID images: folder, .txt list or built-in dataset")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Detector file to write")],
    detector: Annotated[str, typer.Option("--detector", "-d", help="NAME[:k=v,…]")] = "knn",
    encoder: Annotated[str, typer.Option("--encoder", "-e")] = "efficientnet-lite0",
    keep: Annotated[
        float, typer.Option(help="Fraction of held-out ID images the threshold must accept")
    ] = 0.95,
    holdout: Annotated[float, typer.Option(help="Fraction held out for calibration")] = 0.2,
    classes: Annotated[str | None, typer.Option(help="Keep these classes, e.g. '0-4'")] = None,
    per_class: Annotated[int | None, typer.Option(help="Images per class")] = None,
    class_names: ClassNamesOption = None,
    prompts: PromptsOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the hold-out split")] = 0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    cache_dir: CacheDirOption = None,
    download: DownloadOption = False,
    key_file: KeyFileOption = None,
) -> None:
    """Fit a detector on ID images and save it with a threshold calibrated on held-out images."""
    from oodprobe.benchmark_spec import DataSpec, parse_detector_option
    from oodprobe.data import parse_class_selection
    from oodprobe.deploy import fit_deployment

    _check_output_file(output, "detector.safetensors")
    key = _read_key(key_file)
    data = DataSpec(
        source,
        classes=tuple(parse_class_selection(classes)) if classes else None,
        per_class=per_class,
    )
    # without --prompts, the library's default prompt set
    text_options: dict[str, Any] = {"prompts": prompts} if prompts is not None else {}
    deployment = fit_deployment(
        data,
        encoder,
        parse_detector_option(detector),
        keep=keep,
        holdout=holdout,
        seed=seed,
        class_names=_class_names(class_names),
        cache_root=cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        download=download,
        key=key,
        **text_options,
    )
    console = _console()
    _print_skipped(console, deployment.skipped, where=data.label)
    path = deployment.save(output)  # with the fit's key, if one was given
    meta = deployment.metadata
    console.print(
        f"saved {path}: {meta['detector_label']} on {meta['encoder']}, fitted on {meta['n_fit']} "
        f"images; threshold {deployment.threshold:.6g} accepts "
        f"{100 * meta['calibration_acceptance']:.1f}% of {meta['n_calibration']} held-out ID "
        "images",
        soft_wrap=True,
    )


@app.command()
def score(
    source: Annotated[str, typer.Argument(help="Images to score: folder, .txt list or dataset")],
    detector_file: Annotated[
        Path, typer.Option("--detector-file", "-d", help="From 'oodprobe fit'")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="CSV of scores and decisions (replaced only when complete)",
        ),
    ] = Path("scores.csv"),
    threshold: Annotated[
        float | None, typer.Option(help="Override the calibrated threshold")
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    cache_dir: CacheDirOption = None,
    download: DownloadOption = False,
    key_file: KeyFileOption = None,
) -> None:
    """Score images with a saved detector; write scores and accept/reject decisions to a CSV."""
    from oodprobe.benchmark_spec import DataSpec
    from oodprobe.deploy import score_with_deployment

    _check_output_file(output, "scores.csv")
    key = _read_key(key_file)
    data = DataSpec(source)
    scored = score_with_deployment(
        detector_file,
        data,
        threshold=threshold,
        cache_root=cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        download=download,
        key=key,
    )
    path = scored.write_csv(output)  # atomic: replaces an old CSV only once complete
    accepted = int(scored.accepted.sum())
    console = _console()
    _print_skipped(console, scored.skipped, where=data.label)
    console.print(
        f"{len(scored.scores)} images scored: {accepted} accepted as in-distribution, "
        f"{len(scored.scores) - accepted} rejected (threshold {scored.threshold:.6g})"
        + (f", {len(scored.skipped)} skipped (listed in the CSV)" if scored.skipped else ""),
        soft_wrap=True,
    )
    console.print(f"scores: {path}", soft_wrap=True)


# -- oodprobe cache: list, inspect, export and import feature-cache entries --------------------

cache_app = typer.Typer(
    help="List, inspect, export (Parquet) and import feature-cache entries.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

EntryArgument = Annotated[
    str,
    typer.Argument(
        help="A cache entry: its folder, its key, or a unique key prefix ('oodprobe cache list')"
    ),
]
PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")  # what pyarrow writes
if TYPE_CHECKING:
    ParquetCodec = str
else:
    ParquetCodec = Literal[PARQUET_CODECS]


def _cache_root(cache_dir: Path | None) -> Path:
    from oodprobe.cache import default_cache_root

    return cache_dir if cache_dir is not None else default_cache_root()


def _outputs_text(meta: dict[str, Any]) -> str:
    """``features 768-d float16, logits 1000-d float32`` of an entry's meta.json."""
    parts = []
    for name, info in meta["files"].items():
        if name == "indices":
            continue
        dtype = {"<f4": "float32", "<f2": "float16"}.get(info["dtype"], info["dtype"])
        shape = "x".join(str(size) for size in info["shape"][1:])
        parts.append(f"{name} {shape}-d {dtype}")
    return ", ".join(parts)


@cache_app.command("list")
def cache_list(cache_dir: CacheDirOption = None) -> None:
    """One line per entry: key, rows, outputs, encoder and dataset (or why it is unusable)."""
    from rich.markup import escape

    from oodprobe.cache import list_entries

    root = _cache_root(cache_dir)
    entries = list_entries(root)
    console = _console()
    if not entries:
        console.print(f"no cache entries under {escape(str(root))}", soft_wrap=True)
        return
    for entry in entries:
        meta = entry["meta"]
        if meta is None:
            console.print(f"{entry['key'][:16]}  {escape(entry['status'])}", soft_wrap=True)
            continue
        what = meta.get("kind") or f"{meta.get('encoder', '?')} · {meta.get('dataset', '?')}"
        console.print(
            f"{entry['key'][:16]}  {meta['n_rows']} rows  {escape(_outputs_text(meta))}  "
            f"{escape(str(what))}",
            soft_wrap=True,
        )
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    console.print(f"{count} under {escape(str(root))}", soft_wrap=True)


@cache_app.command("info")
def cache_info(
    entry: EntryArgument,
    cache_dir: CacheDirOption = None,
    verify: Annotated[
        bool, typer.Option(help="Hash every file in full (not only those changed since stamped)")
    ] = False,
) -> None:
    """Show an entry's key, provenance and files, and check it (sizes, headers, checksums)."""
    from rich.markup import escape

    from oodprobe.cache import find_entry, read_entry

    directory = find_entry(_cache_root(cache_dir), entry)
    _, meta = read_entry(directory, verify="full" if verify else True, mmap=True)
    console = _console()
    lines = [
        f"entry: {directory}",
        f"key: {meta.get('key', directory.name)}",
        *(
            f"{name}: {meta[name]}"
            for name in ("kind", "encoder", "dataset", "precision", "created", "imported_from")
            if name in meta
        ),
        f"rows: {meta['n_rows']} ({len(meta['skipped'])} image(s) skipped)",
        f"outputs: {_outputs_text(meta)}",
        "head: " + ("none" if not meta.get("head") else "x".join(map(str, meta["head"]["shape"]))),
        "verified: " + ("every file hashed in full" if verify else "sizes, headers and stamps"),
    ]
    for line in lines:
        console.print(escape(line), soft_wrap=True)


@cache_app.command("export")
def cache_export(
    entry: EntryArgument,
    output: Annotated[Path, typer.Argument(help="Parquet file to write (replaced when complete)")],
    cache_dir: CacheDirOption = None,
    row_group_size: Annotated[
        int, typer.Option(min=1, help="Rows per Parquet row group (memory: one row group)")
    ] = 16_384,
    compression: Annotated[ParquetCodec, typer.Option(help="Parquet codec")] = "snappy",
) -> None:
    """Write an entry's rows to Parquet (index, one list column per output) for Ray, pandas…"""
    from oodprobe.cache import find_entry
    from oodprobe.parquet import export_parquet

    _check_output_file(output, "features.parquet")
    directory = find_entry(_cache_root(cache_dir), entry)
    path = export_parquet(directory, output, row_group_size=row_group_size, compression=compression)
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(path).metadata.num_rows
    _console().print(f"{rows} rows written to {path}", soft_wrap=True)


@cache_app.command("import")
def cache_import(
    source: Annotated[Path, typer.Argument(help="Parquet file ('oodprobe cache export')")],
    cache_dir: CacheDirOption = None,
) -> None:
    """Store a Parquet file of features as a cache entry (extraction reuses it by its key)."""
    from oodprobe.cache import read_meta
    from oodprobe.parquet import import_parquet_to_cache

    directory = import_parquet_to_cache(source, _cache_root(cache_dir))
    meta = read_meta(directory)
    console = _console()
    console.print(f"{meta['n_rows']} rows ({_outputs_text(meta)}) in entry", soft_wrap=True)
    console.print(f"entry: {directory}", soft_wrap=True)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show each warning of the run as one ``warning: <message>`` line on stderr, once.

    No source path, line number or code line (they mean nothing to a user); identical messages
    are shown once. Python's default filters are kept (deprecations stay hidden) unless the user
    chose others with ``-W`` or ``PYTHONWARNINGS``; within them every warning is shown, whichever
    code raised it (not once per location), and deduplicated here. Restored on exit.
    """
    seen: set[tuple[str, str]] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = " ".join(str(message).split())
        if (category.__name__, text) in seen:
            return
        seen.add((category.__name__, text))
        # sys.stderr at call time: a live progress bar redirects it to print above itself
        print(f"warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("always")
            for category in (
                DeprecationWarning,
                PendingDeprecationWarning,
                ImportWarning,
                ResourceWarning,
            ):
                warnings.simplefilter("ignore", category)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print user errors in one line, return the exit code.

    Errors raised while the options are parsed (in a callback) are handled like those of a
    command's body; warnings are printed by :func:`_one_line_warnings`.

    OpenMP threads (torch's, faiss') sleep when idle instead of spinning unless the user set
    ``OMP_WAIT_POLICY``: it is read once, when the OpenMP runtime starts, which is after this
    point because building the app imports no torch. On cores shared with other processes,
    spinning threads take the time slices the working ones need (EfficientNet-Lite0 forward
    on 2 cores at load ~7: 8.0 images/s on two spinning threads, 10.4-11.7 passive, 8.8-10.7 on
    one thread); on idle cores both policies run the large kernels alike.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _one_line_warnings():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        result = app(args=argv, prog_name="oodprobe", standalone_mode=False)
    except OodprobeError as error:
        typer.echo(f"error: {error}", err=True)
        return 1
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except Exception as error:
        # typer vendors click; its usage errors carry a context and format_message().
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            typer.echo(context.get_help())
            return 0
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            # typer checks values with pydantic, which prefixes a ValueError's text
            message = str(error.format_message()).replace("Value error, ", "", 1)
            typer.echo(f"error: {message}{hint}", err=True)
            return 1
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
