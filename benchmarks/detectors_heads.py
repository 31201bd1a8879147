"""Speed of the trained heads and text scores against peers, as ratios in one run.

1. ``probe``: our linear probe (and PLP) vs scikit-learn ``LogisticRegression`` (lbfgs,
   multinomial) at equal test accuracy on synthetic features (N=100k, D=768, C=100). Goal: >= 5x.
   Both see the same standardised features; our probe walks an epoch ladder and the first run
   within ``--tolerance`` of sklearn's accuracy is the one timed.
2. ``mcm``: our MCM vs pytorch-ood's ``MCM`` (agreement and time) at matched temperature.
3. ``energy``: our negative energy vs pytorch-ood's ``EnergyBased``.

Run: ``.venv/bin/python benchmarks/detectors_heads.py`` (``--all`` = every section; sizes with
``--n``, ``--dims``, ``--classes``). Needs ``pytorch-ood`` for sections 2-3 (skipped if absent).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import spearmanr

SECTIONS = ("probe", "mcm", "energy")


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def synthetic_features(
    n: int, dims: int, classes: int, seed: int, power: float, separation: float = 0.15
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Gaussian classes, mixed by a fixed random matrix with singular values ``k**-power``.

    ``power`` 0 gives isotropic features (easy for lbfgs); 0.5 correlated, anisotropic ones
    like real embeddings, whose spectrum decays (standardisation does not undo correlation).
    """
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(0)  # the same classes and mixing for train and test
    means = fixed.normal(scale=separation, size=(classes, dims))
    left = np.linalg.qr(fixed.normal(size=(dims, dims)))[0]
    right = np.linalg.qr(fixed.normal(size=(dims, dims)))[0]
    spectrum = np.arange(1, dims + 1, dtype=np.float64) ** -power
    spectrum /= np.sqrt(np.mean(spectrum**2))
    mixing = ((left * spectrum) @ right).astype(np.float32)
    scale = np.exp(fixed.uniform(-2, 2, dims)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    latent = rng.standard_normal((n, dims), dtype=np.float32)
    latent += means[labels].astype(np.float32)
    features = latent @ mixing
    features *= scale  # per-dimension scales and offsets: standardisation matters
    features += fixed.normal(size=dims).astype(np.float32)
    return features, labels


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for index, row in enumerate(cells):
        print(
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def bench_probe(args: argparse.Namespace) -> None:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from oodprobe.detectors.probe import LinearProbeDetector
    from oodprobe.detectors.text import PLPDetector

    features, labels = synthetic_features(args.n, args.dims, args.classes, 10, args.power)
    test_features, test_labels = synthetic_features(
        args.test_n, args.dims, args.classes, 11, args.power
    )
    # warm-up: torch's first optimiser step pays one-off import/initialisation costs
    LinearProbeDetector(epochs=1).fit(features[:512], labels[:512] % 2)

    def fit_sklearn() -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(features)
        model = LogisticRegression(solver="lbfgs", max_iter=args.sklearn_max_iter)
        return scaler, model.fit(scaler.transform(features), labels)

    (scaler, model), sklearn_time = timed(fit_sklearn)
    sklearn_accuracy = float((model.predict(scaler.transform(test_features)) == test_labels).mean())
    target = sklearn_accuracy - args.tolerance
    reference = f"sklearn LogisticRegression lbfgs ({int(model.n_iter_[0])} iterations)"
    rows: list[list[object]] = [
        [reference, "-", "-", f"{sklearn_accuracy:.4f}", f"{sklearn_time:.2f}", "1.0x"]
    ]
    matches: list[tuple[float, int, float]] = []
    for lr in args.lrs:
        for epochs in args.epochs:
            probe = LinearProbeDetector(
                epochs=epochs, batch_size=args.batch_size, lr=lr, device="cpu"
            )
            _, seconds = timed(partial(probe.fit, features, labels))
            accuracy = float((probe.predict(test_features) == test_labels).mean())
            rows.append([f"oodprobe linear-probe b={args.batch_size}", lr, epochs])
            rows[-1] += [f"{accuracy:.4f}", f"{seconds:.2f}", f"{sklearn_time / seconds:.1f}x"]
            if accuracy >= target:
                matches.append((lr, epochs, seconds))
                rows[-1][0] = f"{rows[-1][0]} <- matches"
                break
    if matches:
        # PLP on the same features: zero-shot pseudo-labelling + the probe of the fastest match.
        lr, epochs, _ = min(matches, key=lambda match: match[2])
        rng = np.random.default_rng(3)
        plp = PLPDetector(
            class_embeddings=rng.normal(size=(args.classes, 512)),
            image_projection=rng.normal(size=(args.dims, 512)) / np.sqrt(args.dims),
            epochs=epochs,
            batch_size=args.batch_size,
            lr=lr,
            device="cpu",
        )
        _, plp_seconds = timed(partial(plp.fit, features))
        rows.append(["oodprobe plp (pseudo-labels + probe)", lr, epochs, "-"])
        rows[-1] += [f"{plp_seconds:.2f}", f"{sklearn_time / plp_seconds:.1f}x"]
    print_table(
        f"Linear probe training, N={args.n} D={args.dims} C={args.classes} "
        f"spectrum k^-{args.power} (test N={args.test_n}); torch threads "
        f"{torch.get_num_threads()}",
        ["method", "lr", "epochs", "test accuracy", "fit seconds", "speed-up"],
        rows,
    )
    print(f"\nequal accuracy = within {args.tolerance} of sklearn's; goal >= 5x")
    for lr, epochs, seconds in matches:
        print(f"lr {lr:g}: {epochs} epoch(s) match sklearn, {sklearn_time / seconds:.1f}x faster")


def _peer(name: str) -> Any:
    try:
        import pytorch_ood.detector as detectors
    except ImportError:
        print(f"\n(pytorch-ood is not installed: section {name} skipped; pip install pytorch-ood)")
        return None
    return detectors


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[str, str]:
    """Max |difference| and Spearman rank correlation, theirs flipped to higher = ID."""
    rho = spearmanr(ours, -theirs).statistic
    return f"{np.abs(ours + theirs).max():.1e}", f"{rho:.6f}"


def bench_mcm(args: argparse.Namespace) -> None:
    import torch

    from oodprobe.arrays import l2_normalize
    from oodprobe.detectors.text import MCMDetector

    peers = _peer("mcm")
    if peers is None:
        return
    rng = np.random.default_rng(4)
    joint = 512
    features = rng.normal(size=(args.score_n, args.dims)).astype(np.float32)
    projection = (rng.normal(size=(args.dims, joint)) / np.sqrt(args.dims)).astype(np.float32)
    embeddings = l2_normalize(rng.normal(size=(args.text_classes, joint))).astype(np.float32)
    rows = []
    for temperature in (1.0, 0.01):
        ours = MCMDetector(
            class_embeddings=embeddings, image_projection=projection, temperature=temperature
        ).fit(features[:10])
        our_scores, our_time = timed(partial(ours.score_samples, features))
        peer = peers.MCM(None, torch.from_numpy(embeddings), temperature=temperature)

        def run_peer(peer: Any = peer) -> np.ndarray:
            with torch.no_grad():
                # pytorch-ood takes joint-space embeddings: project as encode_image would
                projected = torch.from_numpy(l2_normalize(features)) @ torch.from_numpy(projection)
                return np.asarray(peer.predict_features(projected).numpy(), dtype=np.float64)

        peer_scores, peer_time = timed(run_peer)
        difference, rho = _agreement(our_scores, peer_scores)
        rows.append([temperature, f"{our_time:.2f}", f"{peer_time:.2f}", difference, rho])
        rows[-1].append(f"{peer_time / our_time:.2f}x")
    print_table(
        f"MCM scoring, N={args.score_n} D={args.dims}->{joint} C={args.text_classes} "
        "(pytorch-ood 0.4 default T=1; CLIP's scale 100 is T=0.01)",
        ["T", "oodprobe s", "pytorch-ood s", "max |diff|", "Spearman", "peer s / ours s"],
        rows,
    )


def bench_energy(args: argparse.Namespace) -> None:
    import torch

    from oodprobe.detectors.probe import LogitsDetector

    peers = _peer("energy")
    if peers is None:
        return
    logits = (np.random.default_rng(5).normal(size=(args.score_n, args.text_classes)) * 4).astype(
        np.float32
    )
    rows = []
    for temperature in (1.0, 10.0):
        ours = LogitsDetector(score="energy", temperature=temperature).fit(logits[:10])
        our_scores, our_time = timed(partial(ours.score_samples, logits))
        peer = peers.EnergyBased(None, t=temperature)

        def run_peer(peer: Any = peer) -> np.ndarray:
            with torch.no_grad():
                scores = peer.predict_logits(torch.from_numpy(logits))
                return np.asarray(scores.numpy(), dtype=np.float64)

        peer_scores, peer_time = timed(run_peer)
        difference, rho = _agreement(our_scores, peer_scores)
        rows.append([temperature, f"{our_time:.3f}", f"{peer_time:.3f}", difference, rho])
        rows[-1].append(f"{peer_time / our_time:.2f}x")
    print_table(
        f"Negative energy, N={args.score_n} C={args.text_classes} (ours float64, peer float32)",
        ["T", "oodprobe s", "pytorch-ood s", "max |diff|", "Spearman", "peer s / ours s"],
        rows,
    )


def int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def float_list(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="run every section (the default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--n", type=int, default=100_000, help="probe training samples")
    parser.add_argument("--test-n", type=int, default=20_000, help="probe test samples")
    parser.add_argument("--dims", type=int, default=768, help="feature dimensions")
    parser.add_argument("--classes", type=int, default=100, help="probe classes")
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch size")
    parser.add_argument(
        "--epochs", type=int_list, default=[1, 2, 3, 5, 10, 20, 30], help="epoch ladder"
    )
    parser.add_argument(
        "--lrs", type=float_list, default=[1e-3, 1e-2], help="peak lrs (paper: 1e-3)"
    )
    parser.add_argument("--power", type=float, default=0.5, help="spectrum decay (0: isotropic)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="accuracy tolerance")
    parser.add_argument("--sklearn-max-iter", type=int, default=1000)
    parser.add_argument("--score-n", type=int, default=100_000, help="samples for mcm/energy")
    parser.add_argument("--text-classes", type=int, default=1000, help="classes for mcm/energy")
    args = parser.parse_args(argv)
    args.sections = SECTIONS if args.all else tuple(args.sections.split(","))
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the selected sections and print one table each, with ratios."""
    import torch

    args = parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}")
    runners = {"probe": bench_probe, "mcm": bench_mcm, "energy": bench_energy}
    for section in args.sections:
        runners[section](args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
