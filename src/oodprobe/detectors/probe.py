"""Logit-based scores (MSP, energy, max-logit) and the linear probe on frozen features.

Every score here is higher = more in-distribution. The probe's training loop is shared by
supervised linear probing (``linear-probe``) and pseudo-label probing (``plp`` in ``text.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy.special import softmax
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import (
    Features,
    Labels,
    Scores,
    budget_rows,
    check_features,
    check_labels,
    current_memory_budget,
    float64_rows,
    is_bfloat16,
    is_memory_mapped,
    release_pages,
    row_blocks,
    take_rows,
)
from oodprobe.detectors.base import (
    Choices,
    Detector,
    DeviceName,
    Number,
    integer,
    register_detector,
    validate_values,
)
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

LogitScore = Literal["msp", "energy", "max-logit"]
ProbePrecision = Literal["auto", "fp32", "bf16"]
LOGIT_SCORES: tuple[str, ...] = ("msp", "energy", "max-logit")
_CHUNK = 16384  # rows per block when scoring, so float64 temporaries stay bounded
TEMPERATURE: list[Any] = [Number(0, closed="neither")]
SCORE: list[Any] = [Choices(*LOGIT_SCORES)]


# -- logit scores ---------------------------------------------------------------------------


def _as_logits(logits: npt.ArrayLike) -> npt.NDArray[Any]:
    array = np.asarray(logits)
    numeric = np.issubdtype(array.dtype, np.number) or is_bfloat16(array.dtype)
    if array.ndim != 2 or array.shape[1] == 0 or not numeric:
        raise InvalidParameterError(
            f"logits must be a numeric 2-D (n_samples, n_classes) array, got shape "
            f"{array.shape} (dtype {array.dtype})"
        )
    return array


def _max_and_exp_sum(
    logits: npt.ArrayLike, temperature: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per row ``m = max(z/T)`` and ``s = Σ exp(z/T − m)`` (so 1 ≤ s ≤ C), in float64.

    The shift by the maximum keeps every exponent ≤ 0 (stable at huge logits). Row blocks
    are exponentiated in place: ~10x faster than ``scipy.special.logsumexp`` at 100k × 1000,
    with bounded float64 temporaries.
    """
    validate_values({"temperature": TEMPERATURE}, {"temperature": temperature}, "logit score")
    array = _as_logits(logits)
    maxima, sums = np.empty(len(array)), np.empty(len(array))
    for rows in row_blocks(len(array), budget_rows(16 * array.shape[1], _CHUNK), release=array):
        block = float64_rows(array, rows)
        if temperature != 1:
            block /= temperature
        block_max = block.max(axis=1)
        block -= block_max[:, None]
        np.exp(block, out=block)
        maxima[rows] = block_max
        sums[rows] = block.sum(axis=1)
    return maxima, sums


def msp(logits: npt.ArrayLike, temperature: float = 1.0) -> Scores:
    """Maximum softmax probability ``max_c softmax(z / T)_c`` per row; (n,) float64, higher = ID."""
    # max_c softmax = exp(m − m) / Σ exp(z/T − m) = 1 / s
    return 1.0 / _max_and_exp_sum(logits, temperature)[1]


def negative_energy(logits: npt.ArrayLike, temperature: float = 1.0) -> Scores:
    """Negative free energy ``T · logsumexp(z / T)`` per row; (n,) float64, higher = ID."""
    maxima, sums = _max_and_exp_sum(logits, temperature)
    return temperature * (maxima + np.log(sums))


def max_logit(logits: npt.ArrayLike) -> Scores:
    """Largest logit ``max_c z_c`` per row; (n,) float64, higher = ID."""
    array = _as_logits(logits)
    maxima = np.empty(len(array), dtype=np.float64)
    for rows in row_blocks(len(array), budget_rows(8 * array.shape[1], _CHUNK), release=array):
        maxima[rows] = float64_rows(array, rows).max(axis=1)
    return maxima


def score_logits(logits: npt.ArrayLike, score: str, temperature: float = 1.0) -> Scores:
    """Apply the named logit score (``msp``, ``energy`` or ``max-logit``); higher = ID."""
    validate_values({"score": SCORE}, {"score": score}, "score_logits")
    if score == "msp":
        return msp(logits, temperature)
    if score == "energy":
        return negative_energy(logits, temperature)
    return max_logit(logits)


def score_logits_torch(logits: torch.Tensor, score: str, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable torch version of :func:`score_logits`: (n,), in float32 at least.

    fp16/bf16 logits are promoted first (a softmax and a log-sum-exp accumulate).
    """
    import torch

    validate_values({"score": SCORE}, {"score": score}, "score_logits_torch")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score == "msp":
        return torch.softmax(logits / temperature, dim=1).amax(dim=1)
    if score == "energy":
        return temperature * torch.logsumexp(logits / temperature, dim=1)
    return logits.amax(dim=1)


@register_detector
class LogitsDetector(Detector):
    """Scores precomputed classifier logits (e.g. EfficientNet-Lite0's ImageNet head).

    MSP: Hendrycks & Gimpel, ICLR 2017; negative energy: Liu et al., NeurIPS 2020; max-logit:
    Hendrycks et al., ICML 2022. Score: ``max softmax(z/T)``, ``T·logsumexp(z/T)`` or
    ``max z`` on the logits ``z`` given as features. Difference from the papers: none in the
    formulas; no ODIN-style input perturbation (the detector sees arrays, not images).
    ``fit`` learns nothing; it records the number of classes so later inputs are checked.
    """

    name: ClassVar[str] = "logits"
    input_array: ClassVar[str] = "logits"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "score": SCORE,
        "temperature": TEMPERATURE,
    }

    def __init__(self, *, score: LogitScore = "msp", temperature: float = 1.0) -> None:
        self.score = score
        self.temperature = temperature

    def fit(self, features: Features, labels: Labels | None = None) -> LogitsDetector:
        """Record ``n_dims_`` (the number of logits) of (n, C) ``features``; returns self."""
        self._validate_params()
        self.n_dims_ = int(check_features(features).shape[1])
        return self

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 scores of (n, C) logits, higher = more in-distribution."""
        check_is_fitted(self)
        logits = check_features(features, n_dims=self.n_dims_)
        return score_logits(logits, self.score, self.temperature)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, C) logits tensor; matches ``score_samples``."""
        return score_logits_torch(self._torch_features(features), self.score, self.temperature)


# -- the linear probe -----------------------------------------------------------------------


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of the optimiser update number ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` reaching 1 at the last warm-up step, then a
    cosine from 1 down to 0, which it reaches at ``step == total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    parameters: list[torch.Tensor],
    *,
    total_steps: int,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with coupled L2 weight decay and the warm-up + cosine schedule (step it per batch).

    Float32/float64 parameters on CPU or CUDA get the fused Adam kernel (one pass over the
    parameters per step instead of ~10; the same update up to rounding), others the default.
    """
    import torch

    fusable = (torch.float32, torch.float64)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in fusable for p in parameters)
    optimizer = torch.optim.Adam(
        parameters, lr=lr, weight_decay=weight_decay, fused=True if fused else None
    )
    warmup_steps = int(warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps)
    )
    return optimizer, scheduler


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cross_entropy_gradient(
    batch: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d weight, d bias) of the mean cross-entropy of ``batch @ weight.T + bias``.

    Closed form ``(softmax(z) − onehot(y))ᵀ x / n``: the same values as autograd, ~25% faster
    per step at probe sizes because no graph is built (tested against autograd).
    ``matmul_dtype`` (e.g. ``torch.bfloat16``) runs both matrix products in that dtype with
    float32 accumulation, as CPU/CUDA autocast would; the softmax, the residual and the returned
    gradients stay float32.
    """
    import torch

    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)
    low = batch if matmul_dtype is None else batch.to(matmul_dtype)
    _gradient_into(low, targets, weight, bias, grad_weight, grad_bias, 1.0 / len(targets))
    return grad_weight, grad_bias


def _gradient_into(
    batch: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    scale: float,
    *,
    accumulate: bool = False,
    rows: torch.Tensor | None = None,
) -> None:
    """Write (or add, ``accumulate``) ``scale · (softmax(z) − onehot(y))ᵀ [x, 1]`` in place.

    ``batch`` is float32, or bf16 for bf16 products (``weight`` is then cast per call; the
    logits and the residual are float32). ``rows`` is a preallocated ``arange`` (saves an
    allocation per step). No new tensor outlives the call; nothing is read back to the host.
    """
    import torch

    if batch.dtype == weight.dtype:
        logits = torch.addmm(bias, batch, weight.t())
    else:  # bf16 product, float32 accumulation inside the GEMM; bias added in float32
        logits = torch.mm(batch, weight.to(batch.dtype).t()).float().add_(bias)
    residual = torch.softmax(logits, dim=1)
    index = torch.arange(len(targets), device=batch.device) if rows is None else rows
    residual[index[: len(targets)], targets] -= 1.0
    residual *= scale
    if accumulate:
        grad_bias.add_(residual.sum(dim=0))
    else:
        torch.sum(residual, dim=0, out=grad_bias)
    if batch.dtype != weight.dtype:
        product = (residual.to(batch.dtype).t() @ batch).float()
        grad_weight.add_(product) if accumulate else grad_weight.copy_(product)
    elif accumulate:
        grad_weight.addmm_(residual.t(), batch)
    else:
        torch.mm(residual.t(), batch, out=grad_weight)


PROBE_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
_TRAIN_CHUNK = 8192  # rows per gradient chunk: bounds the (chunk, D) temporaries of big batches
_RESIDENT_BYTES = 1 << 27  # standardised training copies kept whole on the device up to this


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere) and its vendor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            text = cpuinfo.read(1 << 16)
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "vendor_id"):
            flags.update(value.split())
    return frozenset(flags)


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matrix products run faster than float32 ones on ``device``.

    CUDA: devices with native bf16 (compute capability 8.0+). CPU: AMX (``amx_bf16``, Intel
    Sapphire Rapids and later), or AVX-512 BF16 on AMD (Zen 4+, where float32 FMAs run at half
    width but bf16 dot products do not; measured ~650 vs ~240 GFLOP/s on 2 EPYC cores). On
    Intel CPUs with AVX-512 BF16 but no AMX the bf16 product is *slower* than float32 (measured
    on an Emerald Rapids VM without AMX: ~0.5-0.9x), so they count as not fast. A property of
    the machine, not a timing, so ``precision="auto"`` is deterministic on a given machine.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in flags)


def resolve_probe_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`fast_bf16`, else ``fp32``; other values unchanged."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


_PARALLEL_MACS = 1 << 24  # below this many multiply-adds per step, one CPU thread is faster


@contextlib.contextmanager
def _step_threads(multiply_adds: int, device: torch.device) -> Iterator[None]:
    """Run small CPU steps on one thread (restoring torch's thread count afterwards).

    A step of ``256 x 1280 x 5`` (the offline default's probe) is ~20 µs of GEMM: splitting it
    over threads costs more in synchronisation than it saves, and on cores shared with other
    processes the threads' spin-waits make it far worse (measured on 2 loaded cores: 0.4 s on
    one thread vs 1.4-9.5 s on two for the same 30 epochs). Larger steps keep torch's setting.
    """
    import torch

    if device.type != "cpu" or multiply_adds >= _PARALLEL_MACS or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mean_std(features: Features) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-dimension mean and std in float64, two passes over row blocks (bounded memory)."""
    mean = np.zeros(features.shape[1])
    step = budget_rows(16 * features.shape[1], _CHUNK)
    for rows in row_blocks(len(features), step, release=features):
        mean += float64_rows(features, rows).sum(axis=0)
    mean /= len(features)
    variance = np.zeros(features.shape[1])
    for rows in row_blocks(len(features), step, release=features):
        block = float64_rows(features, rows)
        block -= mean
        variance += np.square(block).sum(axis=0)
    std = np.sqrt(variance / len(features))
    std[std < 1e-12] = 1.0  # a constant dimension carries no information; keep it finite
    return mean, std


def train_linear_probe(
    features: Features,
    labels: Labels,
    n_classes: int,
    *,
    epochs: int,
    batch_size: int | str,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
    seed: int,
    device: str = "auto",
    precision: str = "fp32",
    resident_bytes: int = _RESIDENT_BYTES,
) -> dict[str, npt.NDArray[np.float32]]:
    """Train ``Linear(D, n_classes)`` on standardised features; return weight/bias/mean/std.

    Features are standardised per dimension with their mean and std (no L2). Cross-entropy,
    Adam (coupled weight decay), warm-up + cosine per batch, reshuffled every epoch by a
    generator seeded with ``seed`` (the global torch RNG is left alone). ``batch_size="full"``
    (or any size >= n) is full-batch training: one update per epoch over all samples, in
    chunks of 8192 rows whose gradients add up to the batch's. ``precision="bf16"`` runs the
    two matrix products of each step in bf16 with float32 accumulation; the master weights,
    Adam's state, the softmax and the gradients stay float32 (``"auto"``: bf16 where
    :func:`fast_bf16`).

    Speed: small sets are standardised once and kept as one tensor on the device (bf16 for
    bf16 products) when two copies fit in ``resident_bytes`` (default 128 MiB), and each epoch
    gathers them once in its shuffled order, so a step is two matrix products, a softmax and
    one fused Adam kernel on views; all learning rates are computed up front and no value is
    read back to the host. Larger sets are gathered and standardised per batch into a
    preallocated buffer (bounded memory, the same arithmetic): past a few tens of MiB, writing
    a shuffled copy every epoch costs more memory traffic than it saves (measured at 50k x
    1280: 10-25% slower). Small steps run on one CPU thread (:func:`_step_threads`). Either
    way the random order and the updates are those of the plain loop (per-epoch ``randperm``
    of the seeded generator; tested against it).

    Streamed: a memory-mapped ``features`` (``np.memmap``: float32, float16 or bfloat16), or one
    whose float32 copy exceeds a quarter of the memory budget, is never copied whole: each
    chunk of each batch gathers its rows from the array in the epoch's shuffled order (random
    row reads from the memmap), and the pages read are released every 1/8 of the budget
    (256 MiB without one), so resident memory stays bounded whatever N is. The order, the
    batches and the arithmetic are exactly those of full-array shuffling (the same
    ``randperm``; tested equal to the in-memory path), not a chunk-wise approximation of it;
    what it costs is random reads, fast when the file sits in the page cache or on an SSD.
    """
    import torch

    mean, std = _mean_std(features)
    torch_device = torch.device(_resolve_device(device))
    bf16 = resolve_probe_precision(precision, torch_device) == "bf16"
    store_dtype = torch.bfloat16 if bf16 else torch.float32
    budget = current_memory_budget()
    streamed = is_memory_mapped(features) or (
        budget is not None and features.shape[0] * features.shape[1] * 4 > budget // 4
    )
    raw: torch.Tensor | None = None
    if not streamed:
        with warnings.catch_warnings():
            # read-only inputs (memory-mapped feature caches) are fine: nothing writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.as_tensor(np.asarray(features, dtype=np.float32), device=torch_device)
    release_every = (budget // 8) if budget is not None else 256 << 20
    gathered = [0]  # bytes read from a mapped array since its pages were last released
    targets = torch.as_tensor(labels, dtype=torch.int64, device=torch_device)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=torch_device)
    inv_std_t = torch.as_tensor(1.0 / std, dtype=torch.float32, device=torch_device)

    n_samples, n_dims = features.shape
    full_batch = batch_size == "full" or int(batch_size) >= n_samples
    batch_rows = n_samples if full_batch else int(batch_size)
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(n_dims)  # torch.nn.Linear's default initialisation
    weight = ((torch.rand(n_classes, n_dims, generator=generator) * 2 - 1) * bound).to(torch_device)
    bias = ((torch.rand(n_classes, generator=generator) * 2 - 1) * bound).to(torch_device)
    steps_per_epoch = math.ceil(n_samples / batch_rows)
    total_steps = epochs * steps_per_epoch
    optimizer, _ = make_optimizer(
        [weight, bias],
        total_steps=total_steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
    )
    # The scheduler's values, computed once instead of a LambdaLR call per step (Python work
    # on every step); the same numbers: the base lr times the same factor.
    warmup_steps = int(warmup_fraction * total_steps)
    rates = [lr * warmup_cosine_factor(s, total_steps, warmup_steps) for s in range(total_steps)]
    group = optimizer.param_groups[0]
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    weight.grad, bias.grad = grad_weight, grad_bias  # what the fused Adam reads
    chunk_rows = min(batch_rows, _TRAIN_CHUNK)
    arange = torch.arange(chunk_rows, device=torch_device)
    element = 2 if bf16 else 4
    copies = 1 if full_batch else 2  # the standardised set, and its shuffled gather
    resident = not streamed and copies * n_samples * n_dims * element <= resident_bytes

    standardised: torch.Tensor | None = None
    if resident:
        assert raw is not None
        standardised = torch.empty(n_samples, n_dims, dtype=store_dtype, device=torch_device)
        for rows in row_blocks(n_samples, _TRAIN_CHUNK):
            standardised[rows] = (raw[rows] - mean_t) * inv_std_t
        shuffled = standardised if full_batch else torch.empty_like(standardised)
        buffer = None
    else:
        buffer = torch.empty(chunk_rows, n_dims, dtype=torch.float32, device=torch_device)

    def standardised_rows(index: torch.Tensor | None, start: int, size: int) -> torch.Tensor:
        """Standardised rows ``index[start:start+size]`` (all rows if ``index`` is None)."""
        assert buffer is not None
        chunk = buffer[:size]
        if raw is None:  # streamed: gather the rows from the (memory-mapped) array
            if index is None:
                rows = np.asarray(features[start : start + size])
                gathered[0] += rows.nbytes
                if gathered[0] >= release_every:
                    release_pages(features)
                    gathered[0] = 0
            else:  # random rows: released every 256 (see take_rows)
                rows = take_rows(features, index_host[start : start + size])
            with warnings.catch_warnings():  # a read-only mapped block: only read (copied)
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                chunk.copy_(torch.from_numpy(np.asarray(rows, dtype=np.float32)))
        elif index is None:
            chunk.copy_(raw[start : start + size])
        else:
            torch.index_select(raw, 0, index[start : start + size], out=chunk)
        chunk.sub_(mean_t).mul_(inv_std_t)
        return chunk.to(store_dtype) if bf16 else chunk

    def step_on(index: torch.Tensor | None, epoch_targets: torch.Tensor, first: int) -> None:
        """One update on the batch of rows ``first : first + batch_rows`` of the epoch order."""
        size = min(batch_rows, n_samples - first)
        for offset in range(first, first + size, chunk_rows):
            rows = min(chunk_rows, first + size - offset)
            if resident:
                chunk = shuffled[offset : offset + rows]
            else:
                chunk = standardised_rows(index, offset, rows)
            _gradient_into(
                chunk,
                epoch_targets[offset : offset + rows],
                weight,
                bias,
                grad_weight,
                grad_bias,
                1.0 / size,
                accumulate=offset != first,
                rows=arange,
            )
        optimizer.step()

    step = 0
    index_host = np.empty(0, dtype=np.int64)
    with torch.no_grad(), _step_threads(chunk_rows * n_dims * n_classes, torch_device):
        for _ in range(epochs):
            if full_batch:  # one update over all samples: the order does not change the mean
                index, epoch_targets = None, targets
            else:
                order = torch.randperm(n_samples, generator=generator)
                index_host = order.numpy()
                index = order.to(torch_device)
                epoch_targets = targets.index_select(0, index)
                if resident:
                    assert standardised is not None
                    torch.index_select(standardised, 0, index, out=shuffled)
            for first in range(0, n_samples, batch_rows):
                group["lr"] = rates[step]
                step_on(index, epoch_targets, first)
                step += 1
    release_pages(features)
    return {
        "weight": weight.cpu().numpy(),
        "bias": bias.cpu().numpy(),
        "mean": mean.astype(np.float32),
        "std": std.astype(np.float32),
    }


def fold_standardization(
    weight: npt.ArrayLike, bias: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The affine head ``(W', b')`` of a linear layer on standardised features, in float64.

    ``W·(x − μ)/σ + b = W'·x + b'`` with ``W' = W / σ`` (column-wise) and ``b' = b − W'·μ``, so
    the probe's logits are one matrix product of the raw features (the post-hoc detectors'
    ``head='probe'``). ``weight`` is (C, D), ``bias`` (C,), ``mean`` and ``std`` (D,).
    """
    folded = np.asarray(weight, dtype=np.float64) / np.asarray(std, dtype=np.float64)
    return folded, np.asarray(bias, dtype=np.float64) - folded @ np.asarray(mean, np.float64)


PROBE_CONSTRAINTS: dict[str, list[Any]] = {
    "epochs": [integer(1)],
    "batch_size": [integer(1), Choices("full")],
    "lr": [Number(0, closed="neither")],
    "weight_decay": [Number(0)],
    "warmup_fraction": [Number(0, 1)],
    "seed": [integer(0)],
    "device": [DeviceName()],
    "precision": [Choices(*PROBE_PRECISIONS)],
    "score": SCORE,
    "temperature": TEMPERATURE,
}


class LinearHead(Detector):
    """Shared scoring of a trained linear probe (``weight_``, ``bias_``, ``mean_``, ``std_``)."""

    differentiable: ClassVar[bool] = True

    epochs: int
    batch_size: int | str
    lr: float
    weight_decay: float
    warmup_fraction: float
    seed: int
    device: str
    precision: str
    score: str
    temperature: float

    def _fit_probe(self, features: Features, labels: Labels, n_classes: int) -> None:
        state = train_linear_probe(
            features,
            labels,
            n_classes,
            epochs=int(self.epochs),
            batch_size=self.batch_size if self.batch_size == "full" else int(self.batch_size),
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            warmup_fraction=float(self.warmup_fraction),
            seed=int(self.seed),
            device=self.device,
            precision=self.precision,
        )
        self.weight_, self.bias_ = state["weight"], state["bias"]
        self.mean_, self.std_ = state["mean"], state["std"]
        self.n_dims_ = int(features.shape[1])

    def affine_head(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The fitted probe as ``(W (C, D), b (C,))`` on raw features: ``logits = x·Wᵀ + b``."""
        check_is_fitted(self)
        return fold_standardization(self.weight_, self.bias_, self.mean_, self.std_)

    def _logit_blocks(self, features: Features) -> Iterator[npt.NDArray[np.float64]]:
        """Yield float64 logits of consecutive row blocks (bounded temporaries)."""
        weight, bias = self.affine_head()  # the standardisation folded into the layer
        features = check_features(features, n_dims=self.n_dims_)
        step = budget_rows(8 * (features.shape[1] + 2 * len(bias)), _CHUNK)
        for rows in row_blocks(len(features), step, release=features):
            block = float64_rows(features, rows) @ weight.T
            block += bias
            yield block

    def logits(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, C) float64 probe logits of (n, D) features (the decision function)."""
        return np.concatenate(list(self._logit_blocks(features)))

    def predict_proba(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, C) class probabilities ``softmax(logits)`` (temperature 1)."""
        return np.asarray(softmax(self.logits(features), axis=1))

    def predict(self, features: Features) -> Labels:
        """(n,) predicted class of each row (for ID accuracy; not an OOD decision)."""
        indices = [block.argmax(axis=1) for block in self._logit_blocks(features)]
        return np.asarray(self.classes_)[np.concatenate(indices)]

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 probe scores (``score`` at ``temperature``), higher = more ID."""
        blocks = self._logit_blocks(features)
        return np.concatenate([score_logits(b, self.score, self.temperature) for b in blocks])

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor (float32 at least); as score_samples."""
        import torch

        features = self._torch_features(features)
        standardised = (features - self._torch_constant(self.mean_, features)) / (
            self._torch_constant(self.std_, features)
        )
        logits = torch.nn.functional.linear(
            standardised,
            self._torch_constant(self.weight_, features),
            self._torch_constant(self.bias_, features),
        )
        return score_logits_torch(logits, self.score, self.temperature)


@register_detector
class LinearProbeDetector(LinearHead):
    """Supervised linear probe on frozen features, scored by MSP, energy or max-logit.

    Adaloglou et al., "Adapting Contrastive Language-Image Pretrained (CLIP) Models for
    Out-of-Distribution Detection", TMLR 2024 (the "LP" upper bound). Score:
    ``max softmax(W·(x−μ)/σ + b)/T`` (or energy / max-logit of the same logits). Recipe as the
    paper: per-dimension standardisation, cross-entropy, Adam (lr 1e-3, coupled weight decay
    1e-3), 10% linear warm-up then cosine to 0, seed 42. Differences: ``epochs`` defaults to
    100 and ``batch_size`` to 256 (the paper's CIFAR setting; it used 8192 on ImageNet); the
    exact cross-entropy gradient is computed in closed form instead of by autograd.
    Options beyond the paper: ``batch_size="full"`` (full-batch; raise ``lr``, 100 updates at
    1e-3 underfit) and ``precision`` ``"bf16"`` (bf16 matrix products, float32 weights and
    optimiser state) or ``"auto"`` (bf16 where the hardware runs it faster, see
    :func:`fast_bf16`); the default ``"fp32"`` is the paper's float32 training.
    """

    name: ClassVar[str] = "linear-probe"
    requires_labels: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = PROBE_CONSTRAINTS

    def __init__(
        self,
        *,
        epochs: int = 100,
        batch_size: int | Literal["full"] = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        warmup_fraction: float = 0.1,
        seed: int = 42,
        device: str = "auto",
        precision: ProbePrecision = "fp32",
        score: LogitScore = "msp",
        temperature: float = 1.0,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.seed = seed
        self.device = device
        self.precision = precision
        self.score = score
        self.temperature = temperature

    def fit(self, features: Features, labels: Labels | None = None) -> LinearProbeDetector:
        """Train the probe on (n, D) features and (n,) integer labels; returns self."""
        self._validate_params()
        features = check_features(features)
        if labels is None:
            raise InvalidParameterError(
                "linear-probe needs class labels: call fit(features, labels); for a label-free "
                "probe use 'plp' with class embeddings"
            )
        labels = check_labels(labels, len(features))
        classes, encoded = np.unique(labels, return_inverse=True)
        self.classes_ = classes
        self._fit_probe(features, encoded, len(classes))
        return self
