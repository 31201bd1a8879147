"""Adversarial manipulation of OOD images: the paper's feature-matching attack and PGD on scores.

Two attacks, both in pixel space through the encoder (``pixel_transform`` gives images in
[0, 1]; the encoder normalises inside ``forward``, so gradients w.r.t. pixels are meaningful):

* :func:`feature_matching_attack` — the paper's manipulation (Adaloglou, Michels, Kaiser,
  Kollmann, TMLR 2024, claim 4): Adam on a perturbation δ that raises the cosine similarity of
  ``f(x + δ)`` to the features of a target ID training image, with a smoothness penalty
  (λ = 5e3 "smooth", λ = 0 "patchy").
* :func:`pgd_score_attack` — white-box projected gradient ascent (Madry et al., ICLR 2018) on a
  fitted detector's own differentiable score (``score_samples_torch``), within an L∞ or L2 ball.

This is the one module besides the benchmark runner where encoders and detectors meet: it needs
gradients through both. The saved PNGs (:func:`save_attack_images`) are what evaluation uses:
they are quantised with the budget enforced on the quantised image (:func:`quantize_to_png`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

    from oodprobe.data.base import ImageDataset
    from oodprobe.detectors import Detector
    from oodprobe.encoders import ImageEncoder
    from oodprobe.metrics import MetricResult

__all__ = [
    "AttackEvaluation",
    "AttackResult",
    "encode_images",
    "evaluate_attack",
    "feature_matching_attack",
    "load_attack_images",
    "load_pixels",
    "nearest_targets",
    "perturbation_sizes",
    "pgd_score_attack",
    "quantize_to_png",
    "random_targets",
    "refit_without_targets",
    "robustness_curve",
    "save_attack_images",
    "score_images",
    "select_targets",
]

SMOOTHNESS = {"smooth": 5e3, "patchy": 0.0}
"""The paper's two smoothness weights λ of the feature-matching attack."""

NORMS = ("linf", "l2")

PGD_STEPS = 40
PGD_STEP_FRACTION = 1 / 16
"""PGD's default: 40 steps of ε/16. Chosen from ``benchmarks/attack_pgd_steps.py`` (k-NN on
EfficientNet-Lite0, 32 OOD images, the saved PNGs scored): at ε = 4/255 and 8/255 it drove the
attacked AUROC lowest of the sweep (26.6 % and 20.8 %, clean 92.9 %), against 51–58 % for 40
steps of ε/4 and 73–78 % for 10 steps of ε/4 (Madry et al.'s rule 2.5·ε/steps). The k-NN score
is a maximum over neighbours, rough at the scale of large sign steps: small steps climb it
better, and more of them reach further."""


@dataclass
class AttackResult:
    """Attacked images with what the attack measured; images are (N, 3, H, W) float32 in [0, 1].

    ``clean_scores`` / ``attacked_scores`` are the attacked detector's (N,) scores (higher = more
    in-distribution) of the clean and of the returned images, for score attacks (None for
    feature matching); ``clean_cosines`` / ``attacked_cosines`` the (N,) cosine of each image's
    features to its target's, for feature matching (None for PGD). ``loss_history`` is the mean
    loss over images at each step (PGD: minus the mean score of the iterate). ``budget`` is
    ``(norm, eps)`` for PGD, None for the unbounded feature-matching attack.
    """

    method: str
    clean: torch.Tensor
    adversarial: torch.Tensor
    loss_history: list[float]
    seconds: float
    seconds_per_image_step: float
    params: dict[str, Any]
    budget: tuple[str, float] | None = None
    clean_scores: npt.NDArray[np.float64] | None = None
    attacked_scores: npt.NDArray[np.float64] | None = None
    clean_cosines: npt.NDArray[np.float64] | None = None
    attacked_cosines: npt.NDArray[np.float64] | None = None
    target_indices: npt.NDArray[np.int64] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def success(self) -> npt.NDArray[np.bool_] | None:
        """(N,) whether the attack raised the score above the clean image's (score attacks)."""
        if self.clean_scores is None or self.attacked_scores is None:
            return None
        return np.asarray(self.attacked_scores > self.clean_scores)

    def perturbation(self) -> dict[str, npt.NDArray[np.float64]]:
        """Per-image L∞, L2, PSNR and SSIM of the float adversarial images (see below)."""
        return perturbation_sizes(self.clean, self.adversarial)

    def as_dict(self, *, perturbation: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON-able summary without the images: parameters, timing, per-image numbers.

        ``perturbation`` (e.g. the saved PNGs' sizes from :func:`save_attack_images`) replaces
        the float images' sizes. Non-finite numbers (the PSNR of an unchanged image) are None.
        """
        sizes = self.perturbation() if perturbation is None else perturbation
        per_image: dict[str, Any] = {
            name: _json_list(getattr(self, name))
            for name in (
                "clean_scores",
                "attacked_scores",
                "clean_cosines",
                "attacked_cosines",
                "target_indices",
                "success",
            )
            if getattr(self, name) is not None
        }
        return {
            "method": self.method,
            "n_images": len(self),
            "image_shape": list(self.clean.shape[1:]),
            "params": dict(self.params),
            "budget": None
            if self.budget is None
            else {"norm": self.budget[0], "eps": self.budget[1]},
            "seconds": self.seconds,
            "seconds_per_image_step": self.seconds_per_image_step,
            "loss_history": _json_list(self.loss_history),
            "per_image": per_image,
            "perturbation": {name: _json_list(values) for name, values in sizes.items()},
        }


def _json_list(values: Any) -> list[Any]:
    """A list of plain numbers (bools and ints kept), non-finite floats as None."""
    result: list[Any] = []
    for value in np.asarray(values).ravel().tolist():
        if isinstance(value, float) and not math.isfinite(value):
            result.append(None)
        else:
            result.append(value)
    return result


# -- validation -----------------------------------------------------------------------------


def check_number(
    name: str, value: Any, *, low: float, high: float = math.inf, closed_low: bool = True
) -> float:
    """``value`` as a float: a finite number in [low, high] (low excluded with closed_low off)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
        and (float(value) >= low if closed_low else float(value) > low)
        and float(value) <= high
    )
    if not ok:
        bound = f"{'>=' if closed_low else '>'} {low:g}"
        if math.isfinite(high):
            bound += f" and <= {high:g}"
        raise InvalidParameterError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int: an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidParameterError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _check_images(name: str, images: Any) -> torch.Tensor:
    """(N, 3, H, W) finite floating tensor in [0, 1], N >= 1; returned as float32 on the CPU."""
    import torch

    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = type(images).__name__
        raise InvalidParameterError(
            f"{name} must be a floating-point torch tensor (N, 3, H, W) in [0, 1] from the "
            f"encoder's pixel_transform (see load_pixels), got {kind}"
        )
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise InvalidParameterError(
            f"{name} must have shape (N, 3, H, W) with N >= 1, got {tuple(images.shape)}; "
            f"stack the encoder's pixel_transform outputs (see load_pixels)"
        )
    images = images.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(images).all()):
        raise InvalidParameterError(f"{name} has non-finite values (NaN or infinity)")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise InvalidParameterError(
            f"{name} must be pixels in [0, 1] (not normalised; the encoder normalises inside "
            f"forward), got values in [{low:g}, {high:g}]"
        )
    return images.contiguous()


def _check_device(device: Any) -> torch.device:
    from oodprobe.features import select_device

    return select_device(device)


def input_array_of(detector: Detector) -> str:
    """The encoder output a built detector scores, with its parameters (an ensemble's members)."""
    return type(detector).input_array_for(detector.get_params(deep=False))


def _check_detector(detector: Any, encoder: ImageEncoder) -> None:
    """A fitted detector with a differentiable score over an output the encoder has."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    from oodprobe.detectors import Detector

    if not isinstance(detector, Detector):
        raise InvalidParameterError(
            f"detector must be a fitted oodprobe detector, got {type(detector).__name__}"
        )
    if not type(detector).is_differentiable(detector.get_params(deep=False)):
        detector.score_samples_torch(_empty_features())  # raises the detector's own error
    try:
        check_is_fitted(detector)
    except NotFittedError:
        raise InvalidParameterError(
            f"detector {detector.name!r} is not fitted; fit it on the ID training "
            f"{input_array_of(detector)} of this encoder first"
        ) from None
    name = input_array_of(detector)
    if name not in encoder.outputs:
        raise InvalidParameterError(
            f"detector {detector.name!r} scores the encoder's {name}, and {encoder.name!r} "
            f"gives only: {', '.join(encoder.outputs)}"
        )


def _empty_features() -> torch.Tensor:
    import torch

    return torch.zeros(0, 1)


# -- images in and out of the encoder -------------------------------------------------------


def load_pixels(
    encoder: ImageEncoder, dataset: ImageDataset, indices: Sequence[int] | npt.ArrayLike
) -> torch.Tensor:
    """(N, 3, H, W) float32 pixels in [0, 1] of ``dataset``'s images at ``indices``.

    Decoded and passed through the encoder's ``pixel_transform`` (resize, crop; no
    normalisation): the input both attacks take.
    """
    import torch

    rows = [int(index) for index in np.asarray(indices, dtype=np.int64).ravel()]
    if not rows:
        raise InvalidParameterError("indices must name at least one image, got none")
    bad = [index for index in rows if not 0 <= index < len(dataset)]
    if bad:
        raise InvalidParameterError(
            f"image index {bad[0]} is out of range for {dataset.name!r} with {len(dataset)} images"
        )
    return torch.stack([encoder.pixel_transform(dataset.load(index)) for index in rows]).float()


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def encode_images(
    encoder: ImageEncoder,
    images: torch.Tensor,
    *,
    output: str = "features",
    batch_size: int = 64,
    device: str = "auto",
) -> npt.NDArray[np.float32]:
    """(N, D) float32 ``output`` array of the encoder for (N, 3, H, W) pixels in [0, 1]."""
    import torch

    from oodprobe.features import borrowed_encoder

    images = _check_images("images", images)
    batch_size = check_int("batch_size", batch_size, low=1)
    if output not in encoder.outputs:
        raise InvalidParameterError(
            f"output must be one of the encoder's outputs ({', '.join(encoder.outputs)}), "
            f"got {output!r}"
        )
    target = _check_device(device)
    parts = []
    with borrowed_encoder(encoder, target), torch.no_grad():
        for rows in _batches(len(images), batch_size):
            parts.append(encoder(images[rows].to(target))[output].float().cpu())
    return torch.cat(parts).numpy()


def score_images(
    encoder: ImageEncoder,
    detector: Detector,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str = "auto",
) -> npt.NDArray[np.float64]:
    """(N,) numpy scores (``score_samples``, higher = ID) of images through the encoder."""
    array = encode_images(
        encoder, images, output=input_array_of(detector), batch_size=batch_size, device=device
    )
    return np.asarray(detector.score_samples(array), dtype=np.float64)


# -- targets --------------------------------------------------------------------------------


def random_targets(n_images: int, n_train: int, *, seed: int = 0) -> npt.NDArray[np.int64]:
    """(n_images,) seeded random indices of ID training images, distinct where possible."""
    n_images = check_int("n_images", n_images, low=1)
    n_train = check_int("n_train", n_train, low=1)
    seed = check_int("seed", seed, low=0)
    rng = np.random.default_rng(seed)
    return rng.choice(n_train, size=n_images, replace=n_images > n_train).astype(np.int64)


def nearest_targets(
    features: npt.ArrayLike, train_features: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """(n,) index of the ID training feature with the highest cosine to each of ``features``."""
    from oodprobe.arrays import check_features

    query = check_features(features, name="features", dtype=np.float64)
    train = check_features(
        train_features, name="train_features", dtype=np.float64, n_dims=query.shape[1]
    )
    query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    return np.asarray((query @ train.T).argmax(axis=1), dtype=np.int64)


def _image_ids(image_ids: npt.ArrayLike | None, count: int) -> npt.NDArray[np.int64]:
    """(count,) non-negative integer ids that seed each image's random draws."""
    if image_ids is None:
        return np.arange(count, dtype=np.int64)
    ids = np.asarray(image_ids)
    if ids.shape != (count,) or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise InvalidParameterError(
            f"image_ids must be {count} non-negative integers (one per image), got "
            f"{ids.dtype} values of shape {ids.shape}"
        )
    return ids.astype(np.int64)


def _per_image_generators(seed: int, ids: npt.NDArray[np.int64]) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, id): a run split into parts, or resumed on the
    images it had not finished, draws the same noise for each image as one whole run."""
    import torch

    return [
        torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0])
        )
        for i in ids
    ]


def resolve_attack_precision(precision: Any, device: torch.device) -> str:
    """``auto`` → bf16 on a GPU with bf16 (fp32's range: no gradient underflow), else fp16
    on a GPU, fp32 on the CPU; explicit choices are checked by ``features.resolve_precision``."""
    import torch

    from oodprobe.features import resolve_precision

    resolved = resolve_precision(precision, device)
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return resolved


# fp16 gradients of a loss of order 1 can underflow; both attacks are invariant to the loss's
# scale (Adam normalises its steps, PGD takes the sign or the unit direction)
_LOSS_SCALE = {"fp32": 1.0, "bf16": 1.0, "fp16": 1024.0}


# -- the feature-matching attack ------------------------------------------------------------


def _smoothness(delta: torch.Tensor) -> torch.Tensor:
    """mean((∂_y δ)²) + mean((∂_x δ)²) with forward differences."""
    vertical = delta[:, :, 1:, :] - delta[:, :, :-1, :]
    horizontal = delta[:, :, :, 1:] - delta[:, :, :, :-1]
    zero = delta.new_zeros(())
    return (vertical.square().mean() if vertical.numel() else zero) + (
        horizontal.square().mean() if horizontal.numel() else zero
    )


def _progress(enabled: bool, total: int, description: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False)


def feature_matching_attack(
    encoder: ImageEncoder,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 250,
    lr: float = 1e-3,
    smoothness: float = 5e3,
    init_scale: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    target_indices: npt.ArrayLike | None = None,
    precision: str = "auto",
    image_ids: npt.ArrayLike | None = None,
) -> AttackResult:
    """The paper's manipulation: perturb each image until its features match its target's.

    Adaloglou, Michels, Kaiser, Kollmann, TMLR 2024, claim 4. For OOD ``images`` and ID
    ``targets`` (both (N, 3, H, W) float in [0, 1], through the encoder's ``pixel_transform``),
    δ₀ = ``init_scale``·N(0, 1) (seeded, independent of the batch size) is optimised with Adam
    (``lr``) per batch of ``batch_size`` to minimise
    ``−cos(f(x + δ), f(x_t)) + λ·(mean((∂_y δ)²) + mean((∂_x δ)²))`` (the cosine averaged over
    the batch; λ = ``smoothness``, 5e3 "smooth", 0 "patchy", see ``SMOOTHNESS``), with
    ``x + δ`` clamped to [0, 1] after each step. Target features are computed once without
    gradient. The perturbation is unbounded (its size is reported, not limited), as in the paper.
    ``target_indices`` (optional, the targets' ID training indices) are kept in the result for
    :func:`refit_without_targets`. ``precision`` (``auto``: bf16 autocast on a GPU, fp32 on the
    CPU) is the encoder's forward precision; δ and the optimiser stay float32. Each image's δ₀
    is drawn from (``seed``, its ``image_ids`` entry, default its position), so a run split
    into parts, or resumed on its unfinished images, reproduces one whole run.
    """
    import torch

    from oodprobe.features import autocast_for, borrowed_encoder

    images = _check_images("images", images)
    targets = _check_images("targets", targets)
    if targets.shape != images.shape:
        raise InvalidParameterError(
            f"targets must have the images' shape {tuple(images.shape)} (one target per image), "
            f"got {tuple(targets.shape)}"
        )
    steps = check_int("steps", steps, low=1)
    lr = check_number("lr", lr, low=0.0, closed_low=False)
    smoothness = check_number("smoothness", smoothness, low=0.0)
    init_scale = check_number("init_scale", init_scale, low=0.0)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed, low=0)
    progress = _check_bool("progress", progress)
    indices = None
    if target_indices is not None:
        indices = np.asarray(target_indices, dtype=np.int64).ravel()
        if len(indices) != len(images):
            raise InvalidParameterError(
                f"target_indices must have one index per image ({len(images)}), got {len(indices)}"
            )
    ids = _image_ids(image_ids, len(images))
    target_device = _check_device(device)
    precision = resolve_attack_precision(precision, target_device)
    autocast = functools.partial(autocast_for, precision, target_device)
    scale = _LOSS_SCALE[precision]

    initial = init_scale * torch.stack(
        [torch.randn(images.shape[1:], generator=g) for g in _per_image_generators(seed, ids)]
    )
    adversarial = torch.empty_like(images)
    clean_cosines = np.empty(len(images))
    attacked_cosines = np.empty(len(images))
    step_loss = np.zeros(steps)
    bar = _progress(progress, steps * math.ceil(len(images) / batch_size), "feature matching")
    start = time.perf_counter()
    with borrowed_encoder(encoder, target_device):
        for rows in _batches(len(images), batch_size):
            clean = images[rows].to(target_device)
            with torch.no_grad(), autocast():
                target_features = encoder(targets[rows].to(target_device))["features"].float()
                clean_features = encoder(clean)["features"].float()
                clean_cosines[rows] = _cosines(clean_features, target_features)
            delta = ((clean + initial[rows].to(target_device)).clamp(0.0, 1.0) - clean).detach()
            delta.requires_grad_(True)
            optimizer = torch.optim.Adam([delta], lr=lr)
            for step in range(steps):
                with autocast():
                    features = encoder(clean + delta)["features"].float()
                cosine = torch.nn.functional.cosine_similarity(features, target_features, dim=1)
                penalty = _smoothness(delta) if smoothness > 0 else delta.new_zeros(())
                loss = -cosine.mean() + smoothness * penalty
                # autograd.grad, not backward: no gradients pile up on the encoder's parameters
                (gradient,) = torch.autograd.grad(loss * scale, delta)
                delta.grad = gradient
                optimizer.step()
                with torch.no_grad():
                    delta.copy_((clean + delta).clamp(0.0, 1.0) - clean)
                step_loss[step] += float(loss.detach()) * (rows.stop - rows.start)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            with torch.no_grad():
                result = (clean + delta).clamp(0.0, 1.0)
                adversarial[rows] = result.cpu()
                with autocast():
                    final = encoder(result)["features"].float()
                attacked_cosines[rows] = _cosines(final, target_features)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return AttackResult(
        method="feature-matching",
        clean=images.clone(),
        adversarial=adversarial,
        loss_history=(step_loss / len(images)).tolist(),
        seconds=seconds,
        seconds_per_image_step=seconds / (len(images) * steps),
        params={
            "steps": steps,
            "lr": lr,
            "smoothness": smoothness,
            "init_scale": init_scale,
            "batch_size": batch_size,
            "seed": seed,
            "device": str(target_device),
            "precision": precision,
        },
        clean_cosines=clean_cosines,
        attacked_cosines=attacked_cosines,
        target_indices=indices,
    )


def _cosines(features: torch.Tensor, targets: torch.Tensor) -> npt.NDArray[np.float64]:
    import torch

    return (
        torch.nn.functional.cosine_similarity(features.double(), targets.double(), dim=1)
        .cpu()
        .numpy()
    )


# -- PGD on a detector's score --------------------------------------------------------------


def _project(delta: torch.Tensor, clean: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """δ projected onto the ε ball (per image), then so that clean + δ lies in [0, 1].

    Clamping to the box after the ball only shrinks each |δ_i|, so both norms stay in budget.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (eps / norms).clamp(max=1.0)
    return (clean + delta).clamp(0.0, 1.0) - clean


def _random_start(
    shape: torch.Size, norm: str, eps: float, generator: torch.Generator
) -> torch.Tensor:
    """Uniform in the L∞ ball, or a uniform direction at a uniform radius in the L2 ball."""
    import torch

    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    radius = torch.rand(shape[0], generator=generator).view(-1, 1, 1, 1) * eps
    return direction * radius


def _ascent_step(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return gradient.sign()
    norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return gradient / norms


def pgd_score_attack(
    encoder: ImageEncoder,
    detector: Detector,
    images: torch.Tensor,
    *,
    eps: float = 4 / 255,
    norm: str = "linf",
    step_size: float | None = None,
    steps: int = PGD_STEPS,
    random_start: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    precision: str = "auto",
    image_ids: npt.ArrayLike | None = None,
) -> AttackResult:
    """White-box PGD that raises a fitted detector's score (toward "in-distribution").

    Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018, with the detector's differentiable score as the objective:
    ``s(x) = detector.score_samples_torch(encoder(x)[input_array_of(detector)])`` (the encoder's
    features, or its logits for logit detectors; text detectors project pre-projection
    features themselves). Each step ascends ``sign(∇s)`` (L∞) or ``∇s/‖∇s‖₂`` (L2, per image)
    by ``step_size`` (default ``eps/16``, 40 steps: see :data:`PGD_STEP_FRACTION`), then
    projects δ onto the ``eps`` ball and ``x + δ`` onto [0, 1]. ``random_start`` draws δ₀ in
    the ball (seeded). The returned image is the iterate with the highest score (the clean image
    counts as one, so the attacked score is never below the clean score; ``result.success``
    marks where it is above). Every parameter is checked before any work; a detector without a
    torch score is refused with its own error. ``precision`` and ``image_ids`` (seeding each
    image's random start) as in :func:`feature_matching_attack`; the scores reported are of the
    forward in ``precision``.
    """
    import torch

    from oodprobe.features import autocast_for, borrowed_encoder

    images = _check_images("images", images)
    _check_detector(detector, encoder)
    if norm not in NORMS:
        raise InvalidParameterError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "linf":
        eps = check_number("eps", eps, low=0.0, high=1.0, closed_low=False)
    else:
        eps = check_number("eps", eps, low=0.0, closed_low=False)
    step_size = (
        eps * PGD_STEP_FRACTION
        if step_size is None
        else check_number("step_size", step_size, low=0.0, closed_low=False)
    )
    steps = check_int("steps", steps, low=1)
    random_start = _check_bool("random_start", random_start)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed, low=0)
    progress = _check_bool("progress", progress)
    ids = _image_ids(image_ids, len(images))
    target_device = _check_device(device)
    precision = resolve_attack_precision(precision, target_device)
    autocast = functools.partial(autocast_for, precision, target_device)
    scale = _LOSS_SCALE[precision]
    output = input_array_of(detector)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        with autocast():
            features = encoder(pixels)[output]
        return detector.score_samples_torch(features).float()

    initial = (
        torch.cat(
            [
                _random_start(torch.Size((1, *images.shape[1:])), norm, eps, g)
                for g in _per_image_generators(seed, ids)
            ]
        )
        if random_start
        else torch.zeros_like(images)
    )
    adversarial = images.clone()
    clean_scores = np.empty(len(images))
    attacked_scores = np.empty(len(images))
    step_loss = np.zeros(steps)
    bar = _progress(progress, steps * math.ceil(len(images) / batch_size), f"pgd {norm}")
    start = time.perf_counter()
    with borrowed_encoder(encoder, target_device):
        for rows in _batches(len(images), batch_size):
            clean = images[rows].to(target_device)
            with torch.no_grad():
                best_scores = score(clean)
            clean_scores[rows] = best_scores.double().cpu().numpy()
            best = clean.clone()
            delta = _project(initial[rows].to(target_device), clean, norm, eps)
            for step in range(steps + 1):
                pixels = (clean + delta).detach().requires_grad_(step < steps)
                with torch.enable_grad() if step < steps else torch.no_grad():
                    scores = score(pixels)
                with torch.no_grad():
                    better = scores.detach() > best_scores
                    best[better] = pixels.detach()[better]
                    best_scores = torch.where(better, scores.detach(), best_scores)
                if step == steps:
                    break
                # autograd.grad, not backward: no gradients pile up on the encoder's parameters
                (gradient,) = torch.autograd.grad(scores.sum() * scale, pixels)
                with torch.no_grad():
                    delta = _project(
                        delta + step_size * _ascent_step(gradient, norm), clean, norm, eps
                    )
                step_loss[step] += -float(scores.detach().sum())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(score=f"{float(scores.detach().mean()):.4f}")
            adversarial[rows] = best.cpu()
            attacked_scores[rows] = best_scores.double().cpu().numpy()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return AttackResult(
        method=f"pgd-{norm}",
        clean=images.clone(),
        adversarial=adversarial,
        loss_history=(step_loss / len(images)).tolist(),
        seconds=seconds,
        seconds_per_image_step=seconds / (len(images) * steps),
        params={
            "detector": detector.name,
            "eps": eps,
            "norm": norm,
            "step_size": step_size,
            "steps": steps,
            "random_start": random_start,
            "batch_size": batch_size,
            "seed": seed,
            "device": str(target_device),
            "precision": precision,
        },
        budget=(norm, eps),
        clean_scores=clean_scores,
        attacked_scores=attacked_scores,
    )


# -- perturbation sizes ---------------------------------------------------------------------


def perturbation_sizes(
    clean: torch.Tensor | npt.ArrayLike, adversarial: torch.Tensor | npt.ArrayLike
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-image (N,) ``linf``, ``l2``, ``psnr`` (dB; inf when equal) and ``ssim``.

    Images are (N, 3, H, W) in [0, 1] (tensors or arrays). SSIM is scikit-image's
    ``structural_similarity`` (Wang et al., IEEE TIP 2004) with ``channel_axis`` and
    ``data_range=1``, on a 7-pixel window (smaller, odd, for images under 7 pixels; NaN under 3).
    """
    from skimage.metrics import structural_similarity

    clean_array = _as_array(clean)
    adversarial_array = _as_array(adversarial)
    if clean_array.shape != adversarial_array.shape or clean_array.ndim != 4:
        raise InvalidParameterError(
            f"clean and adversarial must both have shape (N, 3, H, W), got {clean_array.shape} "
            f"and {adversarial_array.shape}"
        )
    delta = (adversarial_array - clean_array).reshape(len(clean_array), -1)
    mse = np.mean(delta**2, axis=1)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)
    window = min(7, *clean_array.shape[2:])
    window -= 1 - window % 2
    ssim = np.full(len(clean_array), np.nan)
    if window >= 3:
        for row in range(len(clean_array)):
            ssim[row] = structural_similarity(
                clean_array[row].transpose(1, 2, 0),
                adversarial_array[row].transpose(1, 2, 0),
                channel_axis=-1,
                data_range=1.0,
                win_size=window,
            )
    return {
        "linf": np.abs(delta).max(axis=1),
        "l2": np.linalg.norm(delta, axis=1),
        "psnr": psnr,
        "ssim": ssim,
    }


def _as_array(images: Any) -> npt.NDArray[np.float64]:
    if type(images).__name__ == "Tensor":
        images = images.detach().cpu().double().numpy()
    return np.asarray(images, dtype=np.float64)


# -- quantisation and saving ----------------------------------------------------------------


def quantize_to_png(
    images: torch.Tensor | npt.ArrayLike,
    *,
    clean: torch.Tensor | npt.ArrayLike | None = None,
    budget: tuple[str, float] | None = None,
) -> npt.NDArray[np.uint8]:
    """(N, H, W, 3) uint8 ``round(x·255)`` of (N, 3, H, W) images in [0, 1], for lossless PNG.

    With ``clean`` and ``budget`` (``(norm, eps)``, as ``AttackResult.budget``) the budget is
    enforced on the quantised images against the clean ones quantised the same way
    (``c = round(clean·255)``): for L∞ each pixel is clamped to ``[c − m, c + m]`` with
    ``m = floor(255·eps)`` integer levels, so ``max |png/255 − c/255| ≤ eps`` exactly (rounding
    alone exceeds it by up to 0.5/255 when ``eps`` is not a whole number of 1/255 levels, and can
    by one level through float error when it is); for L2 an image whose quantised perturbation ``d``
    exceeds ``eps`` gets ``trunc(d·255·eps/‖d‖)`` (towards zero), which is within ``eps``.
    """
    array = _as_array(images)
    if array.ndim != 4 or array.shape[1] != 3:
        raise InvalidParameterError(f"images must have shape (N, 3, H, W), got {array.shape}")
    quantized = np.clip(np.rint(array * 255.0), 0, 255).astype(np.int64)
    if budget is not None:
        if clean is None:
            raise InvalidParameterError("a budget needs the clean images to enforce it against")
        norm, eps = budget
        clean_q = np.clip(np.rint(_as_array(clean) * 255.0), 0, 255).astype(np.int64)
        if clean_q.shape != quantized.shape:
            raise InvalidParameterError(
                f"clean must have the images' shape {array.shape}, got {clean_q.shape}"
            )
        if norm == "linf":
            levels = math.floor(255.0 * float(eps) + 1e-6)
            quantized = np.clip(quantized, clean_q - levels, clean_q + levels)
        elif norm == "l2":
            delta = (quantized - clean_q).astype(np.float64)
            norms = np.linalg.norm(delta.reshape(len(delta), -1), axis=1) / 255.0
            over = norms > float(eps)
            if over.any():
                scale = (float(eps) / norms[over]).reshape(-1, 1, 1, 1)
                shrunk = np.trunc(delta[over] * scale * (1 - 1e-9))
                quantized[over] = clean_q[over] + shrunk.astype(np.int64)
        else:
            raise InvalidParameterError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        quantized = np.clip(quantized, 0, 255)
    return np.ascontiguousarray(quantized.astype(np.uint8).transpose(0, 2, 3, 1))


def _png_to_pixels(array: npt.NDArray[np.uint8]) -> torch.Tensor:
    import torch

    return torch.from_numpy(array.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).contiguous()


def save_attack_images(
    result: AttackResult, folder: str | Path, *, prefix: str = "image"
) -> dict[str, Any]:
    """Write the attack's images: lossless PNGs (what evaluation uses) and the raw tensors.

    ``folder/adversarial/<prefix>-00000.png`` and ``folder/clean/…`` hold the images quantised
    by :func:`quantize_to_png`: ``round(x·255)``, with a PGD result's budget enforced on the
    quantised adversarial image against the equally quantised clean one (so the PNG itself
    satisfies L∞ ≤ ε, or L2 ≤ ε). ``folder/tensors.safetensors`` holds the float32 ``clean``
    and ``adversarial`` tensors before quantisation. Every file is written atomically. Returns
    the paths and the perturbation sizes of the saved PNGs.
    """
    from PIL import Image
    from safetensors.torch import save_file

    from oodprobe.files import atomic_write

    folder = Path(folder)
    clean_png = quantize_to_png(result.clean)
    adversarial_png = quantize_to_png(result.adversarial, clean=result.clean, budget=result.budget)
    paths: dict[str, list[Path]] = {"clean": [], "adversarial": []}
    for kind, arrays in (("clean", clean_png), ("adversarial", adversarial_png)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for row, array in enumerate(arrays):
            path = folder / kind / f"{prefix}-{row:05d}.png"

            def write(temporary: Path, array: npt.NDArray[np.uint8] = array) -> None:
                Image.fromarray(array).save(temporary, format="PNG")  # (H, W, 3) uint8: RGB

            paths[kind].append(atomic_write(path, write))
    tensors = {
        "clean": result.clean.detach().cpu().float().contiguous(),
        "adversarial": result.adversarial.detach().cpu().float().contiguous(),
    }
    tensor_path = atomic_write(
        folder / "tensors.safetensors",
        lambda temporary: save_file(tensors, str(temporary), metadata={"method": result.method}),
    )
    return {
        "clean": paths["clean"],
        "adversarial": paths["adversarial"],
        "tensors": tensor_path,
        "perturbation": perturbation_sizes(
            _png_to_pixels(clean_png), _png_to_pixels(adversarial_png)
        ),
    }


def load_attack_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """(N, 3, H, W) float32 pixels in [0, 1] of saved PNGs (``uint8 / 255``), for evaluation."""
    from PIL import Image

    if not paths:
        raise InvalidParameterError("paths must name at least one PNG, got none")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return _png_to_pixels(np.stack(arrays))


# -- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackEvaluation:
    """ID test vs clean OOD and vs attacked OOD, and acceptance at a threshold if given.

    ``clean_acceptance`` / ``attacked_acceptance`` are the fractions of clean / attacked OOD
    images with ``score >= threshold`` (taken for in-distribution by a deployment);
    ``success_rate`` is the fraction of the OOD images the threshold rejected clean that it
    accepts attacked (None when it rejected none).
    """

    clean: MetricResult
    attacked: MetricResult
    threshold: float | None = None
    clean_acceptance: float | None = None
    attacked_acceptance: float | None = None
    success_rate: float | None = None

    @property
    def auroc_drop(self) -> float:
        return self.clean.auroc - self.attacked.auroc

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean.as_dict(),
            "attacked": self.attacked.as_dict(),
            "auroc_drop": self.auroc_drop,
            "threshold": self.threshold,
            "clean_acceptance": self.clean_acceptance,
            "attacked_acceptance": self.attacked_acceptance,
            "success_rate": self.success_rate,
        }


def evaluate_attack(
    id_scores: npt.ArrayLike,
    clean_ood_scores: npt.ArrayLike,
    attacked_ood_scores: npt.ArrayLike,
    *,
    convention: str = "oodprobe",
    tpr: float = 0.95,
    threshold: float | None = None,
    bootstrap: int = 0,
    seed: int | None = 0,
) -> AttackEvaluation:
    """AUROC / FPR@``tpr`` of ID test vs clean OOD and vs attacked OOD (higher score = ID).

    ``threshold`` (e.g. a deployment file's calibrated one) adds the fraction of OOD images
    accepted (``score >= threshold``) before and after the attack.
    """
    from oodprobe.metrics import evaluate

    clean_array = np.asarray(clean_ood_scores, dtype=np.float64)
    attacked_array = np.asarray(attacked_ood_scores, dtype=np.float64)
    if clean_array.shape != attacked_array.shape:
        raise InvalidParameterError(
            f"clean_ood_scores and attacked_ood_scores must have one score per OOD image each, "
            f"got shapes {clean_array.shape} and {attacked_array.shape}"
        )
    options: dict[str, Any] = {
        "convention": convention,
        "tpr": tpr,
        "bootstrap": bootstrap,
        "seed": seed,
    }
    clean = evaluate(id_scores, clean_array, **options)
    attacked = evaluate(id_scores, attacked_array, **options)
    if threshold is None:
        return AttackEvaluation(clean, attacked)
    cut = check_number("threshold", threshold, low=-math.inf)
    rejected = clean_array < cut
    return AttackEvaluation(
        clean,
        attacked,
        threshold=cut,
        clean_acceptance=float(np.mean(clean_array >= cut)),
        attacked_acceptance=float(np.mean(attacked_array >= cut)),
        success_rate=float(np.mean(attacked_array[rejected] >= cut)) if rejected.any() else None,
    )


def robustness_curve(
    encoder: ImageEncoder,
    detector: Detector,
    id_scores: npt.ArrayLike,
    images: torch.Tensor,
    budgets: Sequence[float],
    *,
    norm: str = "linf",
    threshold: float | None = None,
    convention: str = "oodprobe",
    tpr: float = 0.95,
    quantized: bool = True,
    **options: Any,
) -> list[tuple[float, AttackEvaluation, AttackResult]]:
    """PGD at each budget ε: ``(eps, evaluation, result)`` per budget, in the order given.

    Robustness stated per budget (AUROC and FPR@``tpr`` of ID test vs manipulated OOD as a
    curve over ε). With ``quantized`` (default) the attacked images are scored as the PNGs
    :func:`save_attack_images` writes (budget enforced after quantisation) and the clean
    reference is the equally quantised clean image; otherwise the float images are scored.
    ``options`` go to :func:`pgd_score_attack` (``steps``, ``step_size`` is then eps/16 unless
    given, ``device``, …). All budgets are checked before the first attack.
    """
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
        raise InvalidParameterError(
            f"budgets must be a non-empty list of eps values, got {budgets!r}"
        )
    if norm not in NORMS:
        raise InvalidParameterError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    high = 1.0 if norm == "linf" else math.inf
    checked = [check_number("eps", eps, low=0.0, high=high, closed_low=False) for eps in budgets]
    quantized = _check_bool("quantized", quantized)
    device = options.get("device", "auto")
    curve = []
    for eps in checked:
        result = pgd_score_attack(encoder, detector, images, eps=eps, norm=norm, **options)
        if quantized:
            clean = _png_to_pixels(quantize_to_png(result.clean))
            adversarial = _png_to_pixels(
                quantize_to_png(result.adversarial, clean=result.clean, budget=result.budget)
            )
            clean_scores = score_images(encoder, detector, clean, device=device)
            attacked_scores = score_images(encoder, detector, adversarial, device=device)
        else:
            assert result.clean_scores is not None and result.attacked_scores is not None
            clean_scores, attacked_scores = result.clean_scores, result.attacked_scores
        evaluation = evaluate_attack(
            id_scores,
            clean_scores,
            attacked_scores,
            convention=convention,
            tpr=tpr,
            threshold=threshold,
        )
        curve.append((eps, evaluation, result))
    return curve


def select_targets(
    mode: str,
    n_images: int,
    train_features: npt.ArrayLike,
    *,
    features: npt.ArrayLike | None = None,
    seed: int = 0,
) -> npt.NDArray[np.int64]:
    """Target ID training indices for the feature-matching attack, as the paper picks them.

    ``random``: seeded random training images (:func:`random_targets`); ``nearest``: for each
    OOD image's ``features``, the training image with the highest cosine
    (:func:`nearest_targets`).
    """
    train = np.asarray(train_features)
    if mode == "random":
        return random_targets(n_images, len(train), seed=seed)
    if mode == "nearest":
        if features is None:
            raise InvalidParameterError("nearest targets need the OOD images' features")
        targets = nearest_targets(features, train)
        if len(targets) != n_images:
            raise InvalidParameterError(
                f"features must have one row per image ({n_images}), got {len(targets)}"
            )
        return targets
    raise InvalidParameterError(f"target mode must be one of random, nearest, got {mode!r}")


def refit_without_targets(
    detector: Detector,
    train_features: npt.ArrayLike,
    target_indices: npt.ArrayLike,
    labels: npt.ArrayLike | None = None,
) -> Detector:
    """A clone of ``detector`` fitted on the ID training features without the attack's targets.

    For the feature-matching attack: a manipulated image matched to its own target could be
    accepted just because that target is in the k-NN reference set; evaluating against a
    detector fitted without every target image (paper, claim 4) rules this out.
    """
    from sklearn.base import clone

    train = np.asarray(train_features)
    removed = np.unique(np.asarray(target_indices, dtype=np.int64).ravel())
    if removed.size and (removed.min() < 0 or removed.max() >= len(train)):
        raise InvalidParameterError(
            f"target_indices must index the {len(train)} ID training features, got values in "
            f"[{removed.min()}, {removed.max()}]"
        )
    keep = np.setdiff1d(np.arange(len(train)), removed)
    if keep.size == 0:
        raise InvalidParameterError(
            "removing the targets leaves no ID training features; use fewer distinct targets"
        )
    refitted: Detector = clone(detector)
    kept_labels = None if labels is None else np.asarray(labels)[keep]
    return refitted.fit(train[keep], kept_labels)
