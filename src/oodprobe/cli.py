"""The ``oodprobe`` command line: a thin shell over the library.

Each command parses options, calls one library function and prints. User-fixable problems
(:class:`oodprobe.errors.OodprobeError`) are printed in one line with exit code 1; anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from oodprobe.errors import DataError, OodprobeError

app = typer.Typer(
    name="oodprobe",
    help="Out-of-distribution detection with frozen features of pretrained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # piped or redirected: rich would assume 80 columns and fold the results table
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


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
    batch_size: Annotated[int, typer.Option(help="Images per forward pass")] = 64,
    workers: Annotated[
        int | None, typer.Option(help="Decoding worker processes (default: spare cores)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp16 on GPU), fp32, fp16, bf16")] = "auto",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Feature cache root (default $OODPROBE_CACHE or ~/.cache)")
    ] = None,
    on_error: Annotated[
        str, typer.Option(help="Undecodable images: 'skip' (and list) or 'raise'")
    ] = "skip",
    download: Annotated[
        bool, typer.Option(help="Allow downloading a built-in dataset that is not on disk")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary")] = False,
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
    console.print(f"features: {result.path}  (plain .npy files; np.load works)")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} undecodable image(s):[/]")
        for item in result.skipped[:20]:
            console.print(f"  {item.source}: {item.reason}")
        if len(result.skipped) > 20:
            console.print(f"  … and {len(result.skipped) - 20} more (see --json)")


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
    for prefix, entry in ENCODERS.items():
        name = prefix if entry.offline else f"{prefix}:…"
        table.add_row(
            name,
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


@app.command()
def detectors() -> None:
    """List the detectors, what each needs, and the built-in benchmark presets."""
    from rich.table import Table

    from oodprobe.benchmark_spec import benchmark_names
    from oodprobe.detectors import DETECTORS

    table = Table(title="detectors (use as --detector NAME or NAME:key=value,…)")
    for column in ("name", "needs", "scores", "what"):
        table.add_column(column)
    for name, cls in DETECTORS.items():
        needs = [
            need
            for need, required in (("labels", cls.requires_labels), ("text", cls.requires_text))
            if required
        ]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(name, ", ".join(needs) or "nothing", cls.input_array, summary)
    console = _console()
    console.print(table)
    presets = ", ".join(benchmark_names())
    console.print(f"benchmark presets (oodprobe bench --preset NAME): {presets}")


def _print_results(run: Any, console: Any) -> None:
    from rich.table import Table

    from oodprobe.report.tables import build_tables, format_ci, format_percent, fpr_label

    convention = run.rows[0]["convention"] if run.rows else run.spec.convention
    fpr_name = fpr_label(run.spec.tpr)
    for table in build_tables(run.rows):
        positive = run.rows[0]["fpr_positive"].upper() if run.rows else "ID"
        grid = Table(
            title=f"{table.encoder}: AUROC / {fpr_name} / AUPR-In in % "
            f"(convention '{convention}': {positive} positive; AUROC CI = bootstrap 95%)"
        )
        grid.add_column("detector", no_wrap=True)
        for column in table.columns:
            group = table.groups[column]
            grid.add_column(column if group == "mean" else f"{column}\n({group})", justify="right")
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
            grid.add_row(detector, *cells)
        console.print(grid)
    for entry in run.id_accuracy:
        console.print(
            f"ID accuracy ({entry['encoder']}, {entry['method']}): {100 * entry['accuracy']:.1f}%"
        )


@app.command()
def bench(
    config: Annotated[
        Path | None, typer.Argument(help="Benchmark TOML file (default: the offline preset)")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Built-in preset: offline-default, cifar10, cifar100, imagenet"),
    ] = None,
    encoder: Annotated[
        list[str] | None, typer.Option("--encoder", "-e", help="Encoder(s) replacing the config's")
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option("--detector", "-d", help="Detector(s) replacing the config's: NAME[:k=v,…]"),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder")] = None,
    bootstrap: Annotated[
        int | None, typer.Option(help="Bootstrap resamples for confidence intervals (0: none)")
    ] = None,
    convention: Annotated[
        str | None, typer.Option(help="Metric convention: oodprobe, openood, pytorch-ood, …")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass")] = 64,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root")] = None,
    download: Annotated[bool, typer.Option(help="Allow downloading built-in datasets")] = False,
) -> None:
    """Run a benchmark (no arguments: the built-in offline default) and write a report."""
    from dataclasses import replace

    from oodprobe.benchmark import run_benchmark
    from oodprobe.benchmark_spec import create_benchmark, load_benchmark, validate
    from oodprobe.presets import DEFAULT_BENCHMARK

    if config is not None and preset is not None:
        raise OodprobeError("give either a CONFIG file or --preset, not both")
    spec = (
        load_benchmark(config)
        if config is not None
        else create_benchmark(preset or DEFAULT_BENCHMARK)
    )
    spec = spec.with_overrides(encoders=encoder, detectors=detector)
    if bootstrap is not None:
        spec = validate(replace(spec, bootstrap=bootstrap))
    if convention is not None:
        spec = validate(replace(spec, convention=convention))
    console = _console()
    output_dir = output or Path("oodprobe-results") / spec.name
    console.print(
        f"[bold]benchmark {spec.name}[/]: {len(spec.encoders)} encoder(s), "
        f"{len(spec.detectors)} detector(s), {len(spec.ood)} OOD set(s)"
    )
    try:
        run = run_benchmark(
            spec,
            output_dir,
            cache_root=cache_dir,
            device=device,
            batch_size=batch_size,
            download=download,
            log=lambda message: console.print(message, style="dim"),
        )
    except DataError as error:
        if config is not None:
            raise
        # a preset's data lives where the preset looks: say where that is
        raise DataError(f"{error} (preset {spec.name}: {spec.description})") from error
    _print_results(run, console)
    console.print(f"finished in {run.seconds:.0f} s")
    console.print(f"results: {run.files['json']}  {run.files['csv']}")
    console.print(f"report:  [bold]{run.files['report']}[/]")


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
    seed: Annotated[int, typer.Option(help="Seed of the hold-out split")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root")] = None,
) -> None:
    """Fit a detector on ID images and save it with a threshold calibrated on held-out images."""
    from oodprobe.benchmark_spec import DataSpec, parse_detector_option
    from oodprobe.data import parse_class_selection
    from oodprobe.deploy import fit_deployment

    data = DataSpec(
        source,
        classes=tuple(parse_class_selection(classes)) if classes else None,
        per_class=per_class,
    )
    deployment = fit_deployment(
        data,
        encoder,
        parse_detector_option(detector),
        keep=keep,
        holdout=holdout,
        seed=seed,
        cache_root=cache_dir,
        device=device,
    )
    path = deployment.save(output)
    meta = deployment.metadata
    _console().print(
        f"saved {path}: {meta['detector_label']} on {meta['encoder']}, fitted on {meta['n_fit']} "
        f"images; threshold {deployment.threshold:.6g} accepts "
        f"{100 * meta['calibration_acceptance']:.1f}% of {meta['n_calibration']} held-out ID images"
    )


@app.command()
def score(
    source: Annotated[str, typer.Argument(help="Images to score: folder, .txt list or dataset")],
    detector_file: Annotated[
        Path, typer.Option("--detector-file", "-d", help="From 'oodprobe fit'")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV of scores and decisions")] = (
        Path("scores.csv")
    ),
    threshold: Annotated[
        float | None, typer.Option(help="Override the calibrated threshold")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root")] = None,
) -> None:
    """Score images with a saved detector; write scores and accept/reject decisions to a CSV."""
    from oodprobe.benchmark_spec import DataSpec
    from oodprobe.deploy import score_with_deployment

    scored = score_with_deployment(
        detector_file, DataSpec(source), threshold=threshold, cache_root=cache_dir, device=device
    )
    path = scored.write_csv(output)
    accepted = int(scored.accepted.sum())
    _console().print(
        f"{len(scored.scores)} images scored: {accepted} accepted as in-distribution, "
        f"{len(scored.scores) - accepted} rejected (threshold {scored.threshold:.6g})"
        + (f", {len(scored.skipped)} skipped" if scored.skipped else "")
    )
    _console().print(f"scores: {path}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print user errors in one line, return the exit code."""
    try:
        result = app(args=argv, standalone_mode=False)
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
            typer.echo(f"error: {error.format_message()}{hint}", err=True)
            return 1
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
