"""CLIPN (Wang et al., ICCV 2023): the checkpoint loader, the no text tower, ATD and CTW.

A tiny random open_clip model is saved in CLIPN's checkpoint layout (their training's
``{"epoch", "name", "state_dict", "optimizer"}`` with DistributedDataParallel's ``module.``
prefix, the no tower under ``*_no`` keys and 16 no-prompts) and loaded through
``create_encoder("clipn:tiny-test/PATH")``. The references are open_clip's own ``encode_text`` /
``encode_image`` and CLIPN's evaluation formulas written out element by element.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import detectors.test_contract as contract
from detectors.conftest import ClusterData, make_cluster_data
from oodprobe.detectors import DETECTORS, Detector, create_detector, load_detector
from oodprobe.encoders import create_encoder, encoder_name_traits, parse_encoder_name
from oodprobe.encoders.base import TextImageEncoder
from oodprobe.encoders.clipn import (
    CLIPN_PROMPTS,
    WEIGHTS_URLS,
    CLIPNEncoder,
    compute_no_class_embeddings,
)
from oodprobe.encoders.text import compute_class_embeddings
from oodprobe.errors import InvalidParameterError, MissingWeightsError, UnknownNameError

ARCH = "tiny-test"
NO_KEYS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
CLASS_NAMES = ["dog", "cat", "car"]
PROMPTS = CLIPN_PROMPTS[:2] + CLIPN_PROMPTS[-1:]  # quotes, and the "with" half, included


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    yes_model: Any  # open_clip CLIP holding the checkpoint's yes weights
    no_model: Any  # open_clip CLIP holding the no weights, position embedding + mean prompt
    state: dict[str, torch.Tensor]


def clipn_state(yes_model: Any, seed: int) -> dict[str, torch.Tensor]:
    """CLIPN's ``CLIP.state_dict()``: open_clip's keys, the no tower's and ``prompt_no``."""
    generator = torch.Generator().manual_seed(seed)
    state = {key: value.clone() for key, value in yes_model.state_dict().items()}
    for key, value in list(state.items()):
        head, dot, rest = key.partition(".")
        if head in NO_KEYS:  # CLIPN starts the no tower as a copy; trained, it differs
            noise = torch.randn(value.shape, generator=generator)
            state[f"{head}_no{dot}{rest}"] = value + 0.1 * noise * value.std().clamp(min=0.02)
    width = state["positional_embedding"].shape
    state["prompt_no"] = 0.05 * torch.randn(16, *width, generator=generator)
    return state


def save_clipn(state: dict[str, torch.Tensor], path: Path) -> Path:
    """As CLIPN's training saves an epoch: DDP's ``module.`` prefix, optimizer state beside."""
    torch.save(
        {
            "epoch": 10,
            "name": "2023_08_23-model_ViT-B-16",
            "state_dict": {f"module.{key}": value for key, value in state.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1]}]},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_openclip: str, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    import open_clip

    torch.manual_seed(1)
    yes_model = open_clip.create_model(ARCH).eval()
    state = clipn_state(yes_model, seed=2)
    path = save_clipn(state, tmp_path_factory.mktemp("clipn") / "CLIPN_ATD_epoch_10.pt")
    # the no tower as a plain open_clip text tower: CLIPN adds mean(prompt_no) to the input
    # embeddings at every position, which is the same as adding it to the position embedding
    no_model = open_clip.create_model(ARCH).eval()
    no_state = {key: value for key, value in yes_model.state_dict().items()}
    for key in no_state:
        head, dot, rest = key.partition(".")
        if head in NO_KEYS:
            no_state[key] = state[f"{head}_no{dot}{rest}"]
    no_state["positional_embedding"] = state["positional_embedding_no"] + state["prompt_no"].mean(0)
    no_model.load_state_dict(no_state)
    return Checkpoint(path, yes_model, no_model, state)


@pytest.fixture(scope="module")
def encoder(checkpoint: Checkpoint) -> CLIPNEncoder:
    built = create_encoder(f"clipn:{ARCH}/{checkpoint.path}")
    assert isinstance(built, CLIPNEncoder)
    return built


def pixels(count: int = 6) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def tokens(texts: list[str]) -> torch.Tensor:
    import open_clip

    return open_clip.get_tokenizer(ARCH)(texts)


# -- the encoder -----------------------------------------------------------------------------


def test_clipn_encoder_gives_the_checkpoints_images_yes_texts_and_no_texts(
    encoder: CLIPNEncoder, checkpoint: Checkpoint
) -> None:
    assert isinstance(encoder, TextImageEncoder)  # MCM and the other text detectors run on it
    assert (encoder.feature_dim, encoder.embed_dim) == (64, 32)
    assert encoder.name == f"clipn:{ARCH}/{checkpoint.path}"
    images = pixels()
    texts = ["a photo of a dog.", "'a bad photo of a cat.'", "no car"]
    with torch.inference_mode():
        expected_images = checkpoint.yes_model.encode_image(encoder.normalize(images))
        features = encoder(images)["features"]
        torch.testing.assert_close(encoder.project_features(features), expected_images)
        yes = encoder.encode_texts(texts)
        no = encoder.encode_no_texts(texts)
        torch.testing.assert_close(yes, checkpoint.yes_model.encode_text(tokens(texts)))
        torch.testing.assert_close(no, checkpoint.no_model.encode_text(tokens(texts)))
    assert not torch.allclose(yes, no, atol=1e-2)  # two towers, not one read twice
    assert math.isclose(encoder.logit_scale, float(checkpoint.state["logit_scale"].exp()))


def test_clipn_prompts_are_their_128_inference_lines_verbatim() -> None:
    assert len(CLIPN_PROMPTS) == 128 and all("{}" in prompt for prompt in CLIPN_PROMPTS)
    assert CLIPN_PROMPTS[0] == "'a bad photo of a {}.'"
    assert CLIPN_PROMPTS[34] == "'a photo of a {}.',"  # the comma is in their prompt.txt
    assert CLIPN_PROMPTS[64] == "'a bad photo with a {}.'"
    assert CLIPN_PROMPTS[94] == "'a {} appearing in a video game.'"
    assert CLIPN_PROMPTS[98] == "'a photo with a {}.',"
    assert CLIPN_PROMPTS[127] == "'a tattoo with the {}.'"


def test_no_class_embeddings_average_normalised_prompts_like_merge_yes_no_feature(
    encoder: CLIPNEncoder, checkpoint: Checkpoint
) -> None:
    def merged(model: Any) -> np.ndarray:  # CLIPN's sum of unit embeddings, normalised
        rows = []
        for name in CLASS_NAMES:
            with torch.inference_mode():
                embedded = model.encode_text(tokens([p.format(name) for p in PROMPTS]))
            total = torch.nn.functional.normalize(embedded, dim=-1).sum(dim=0)
            rows.append(torch.nn.functional.normalize(total, dim=0).numpy())
        return np.stack(rows)

    no = compute_no_class_embeddings(encoder, CLASS_NAMES, PROMPTS)
    yes = compute_class_embeddings(encoder, CLASS_NAMES, PROMPTS)
    assert no.shape == yes.shape == (3, 32) and no.dtype == np.float32
    np.testing.assert_allclose(no, merged(checkpoint.no_model), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yes, merged(checkpoint.yes_model), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidParameterError, match="need a CLIPN encoder"):
        compute_no_class_embeddings(create_encoder(f"openclip:{ARCH}/random"), CLASS_NAMES)  # type: ignore[arg-type]


def test_clipn_cache_id_names_the_weights_and_the_no_view_has_its_own(
    encoder: CLIPNEncoder, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    digest = hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()
    assert encoder.weights_digest == digest == encoder.identity["weights_sha256"]
    assert encoder.identity["weights_path"] == str(checkpoint.path.resolve())
    copy = tmp_path / "copy.pt"
    shutil.copyfile(checkpoint.path, copy)
    copied = create_encoder(f"clipn:{ARCH}/{copy}")
    assert copied.cache_id != encoder.cache_id  # another file
    assert copied.portable_id == encoder.portable_id  # the same bytes
    other_path = save_clipn(clipn_state(checkpoint.yes_model, seed=5), tmp_path / "other.pt")
    other = create_encoder(f"clipn:{ARCH}/{other_path}")
    assert other.portable_id != encoder.portable_id
    view = encoder.no_text_encoder()
    assert view is encoder.no_text_encoder()
    assert view.cache_id not in (encoder.cache_id, copied.cache_id)
    assert view.image_projection is encoder.image_projection
    with torch.inference_mode():
        torch.testing.assert_close(view.encode_texts(["a dog"]), encoder.encode_no_texts(["a dog"]))
    assert encoder_name_traits(f"clipn:{ARCH}/{checkpoint.path}") == (True, ("features",))


# -- refusals, one line each -------------------------------------------------------------------


def test_missing_clipn_weights_say_where_to_get_them(tiny_openclip: str, tmp_path: Path) -> None:
    missing = tmp_path / "CLIPN_ATD_Repeat2_epoch_10.pt"
    with pytest.raises(MissingWeightsError) as error:
        create_encoder(f"clipn:{ARCH}/{missing}")
    assert str(error.value) == (
        f"CLIPN checkpoint not found: {missing}; download a CLIPN checkpoint (ViT-B-16, "
        f"repeats 1-3: {', '.join(WEIGHTS_URLS)}; linked from the README of "
        f"https://github.com/xmed-lab/CLIPN, 'Reproduced Results') and pass its path: "
        f"'clipn:{ARCH}/PATH_TO_CHECKPOINT.pt'"
    )
    assert "\n" not in str(error.value)


class Payload:
    """An object only full unpickling can rebuild (what weights_only refuses)."""


def test_clipn_refuses_files_that_need_unpickling_or_are_no_checkpoint(
    tiny_openclip: str, tmp_path: Path
) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, unsafe)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path in (unsafe, text):
        with pytest.raises(InvalidParameterError) as error:
            create_encoder(f"clipn:{ARCH}/{path}")
        message = str(error.value)
        assert message.startswith(f"{path} is not a checkpoint torch.load(weights_only=True) ")
        assert "oodprobe never unpickles arbitrary objects" in message and "\n" not in message
    tensors = tmp_path / "tensor.pt"
    torch.save([torch.zeros(2)], tensors)
    with pytest.raises(InvalidParameterError, match=r"holds no state dict"):
        create_encoder(f"clipn:{ARCH}/{tensors}")


def test_clipn_refuses_a_plain_clip_and_a_checkpoint_of_another_architecture(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    import open_clip

    plain = tmp_path / "plain.pt"
    torch.save(checkpoint.yes_model.state_dict(), plain)
    with pytest.raises(InvalidParameterError) as error:
        create_encoder(f"clipn:{ARCH}/{plain}")
    assert str(error.value).startswith(
        f"{plain} holds a CLIP without CLIPN's no text encoder (no transformer_no / prompt_no "
        f"weights); load a plain CLIP checkpoint as 'openclip:{ARCH}/{plain}', or download"
    )
    wide = {**open_clip.factory._MODEL_CONFIGS[ARCH], "embed_dim": 16}
    open_clip.factory._MODEL_CONFIGS["tiny-test-16"] = wide
    try:
        with pytest.raises(InvalidParameterError) as error:
            create_encoder(f"clipn:tiny-test-16/{checkpoint.path}")
    finally:
        del open_clip.factory._MODEL_CONFIGS["tiny-test-16"]
    assert str(error.value) == (
        f"{checkpoint.path} does not fit open_clip tiny-test-16: visual.proj has shape (64, 32), "
        f"tiny-test-16 needs (64, 16); pass the architecture the CLIPN checkpoint was trained "
        f"from (ViT-B-16 or ViT-B-32)"
    )
    partial = dict(checkpoint.state)
    del partial["prompt_no"], partial["ln_final_no.bias"]
    broken = save_clipn(partial, tmp_path / "partial.pt")
    with pytest.raises(InvalidParameterError, match="has no usable prompt_no"):
        create_encoder(f"clipn:{ARCH}/{broken}")
    partial["prompt_no"] = checkpoint.state["prompt_no"]
    broken = save_clipn(partial, tmp_path / "partial.pt")
    with pytest.raises(
        InvalidParameterError, match=r"does not fit a CLIPN .*missing ln_final_no.bias"
    ):
        create_encoder(f"clipn:{ARCH}/{broken}")


def test_clipn_names_are_checked_before_any_file_is_read(tiny_openclip: str) -> None:
    with pytest.raises(InvalidParameterError, match=r"look like 'clipn:ARCH/PATH_TO_CHECKPOINT'"):
        create_encoder(f"clipn:{ARCH}")
    with pytest.raises(UnknownNameError, match="unknown open_clip architecture 'ViT-Q-99'"):
        create_encoder("clipn:ViT-Q-99/weights.pt")
    with pytest.raises(InvalidParameterError, match="clipn encoders have no layer variants"):
        parse_encoder_name(f"clipn:{ARCH}/weights.pt,layer=2")


# -- ATD and CTW against CLIPN's evaluation, element by element ------------------------------


def hand_scores(
    images: np.ndarray, yes: np.ndarray, no: np.ndarray, scale: float
) -> tuple[list[float], list[float]]:
    """CLIPN's zero_shot_infer.py for each image: logits, 2-way softmax, ATD sum, CTW pick."""
    atd, ctw = [], []
    for image in images:
        unit = image / math.sqrt(sum(value * value for value in image))
        cos_yes = [float(unit @ (row / np.linalg.norm(row))) for row in yes]
        cos_no = [float(unit @ (row / np.linalg.norm(row))) for row in no]
        logits = [scale * value for value in cos_yes]
        logits_no = [scale * value for value in cos_no]
        yes_no = [
            math.exp(a) / (math.exp(a) + math.exp(b))
            for a, b in zip(logits, logits_no, strict=True)
        ]
        total = sum(math.exp(value) for value in logits)
        probabilities = [math.exp(value) / total for value in logits]
        atd.append(sum(p * q for p, q in zip(yes_no, probabilities, strict=True)))
        ctw.append(yes_no[logits.index(max(logits))])
    return atd, ctw


@pytest.mark.parametrize("scale", [100.0, 10.0])
def test_atd_and_ctw_equal_a_hand_computation_on_a_tiny_random_model(
    encoder: CLIPNEncoder, checkpoint: Checkpoint, scale: float
) -> None:
    images = pixels(8)
    with torch.inference_mode():
        raw_images = checkpoint.yes_model.encode_image(encoder.normalize(images)).double().numpy()
        features = encoder(images)["features"].numpy()
    # the runner's arrays: yes and no class embeddings over the same prompts, the projection
    yes = compute_class_embeddings(encoder, CLASS_NAMES, PROMPTS)
    no = compute_no_class_embeddings(encoder, CLASS_NAMES, PROMPTS)
    assert encoder.image_projection is not None
    projection = encoder.image_projection.numpy()
    # hand: from the raw open_clip image features, and class embeddings merged as CLIPN does
    with torch.inference_mode():
        hand_yes: list[np.ndarray] = []
        hand_no: list[np.ndarray] = []
        for name in CLASS_NAMES:
            texts = tokens([prompt.format(name) for prompt in PROMPTS])
            for model, rows in ((checkpoint.yes_model, hand_yes), (checkpoint.no_model, hand_no)):
                unit = torch.nn.functional.normalize(model.encode_text(texts).double(), dim=-1)
                rows.append(unit.sum(dim=0).numpy())
    atd, ctw = hand_scores(raw_images, np.stack(hand_yes), np.stack(hand_no), scale)
    arrays = {"class_embeddings": yes, "no_class_embeddings": no, "image_projection": projection}
    for name, expected in (("clipn-atd", atd), ("clipn-ctw", ctw)):
        detector = create_detector(name, **arrays, logit_scale=scale).fit(features)
        scores = detector.score_samples(features)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
        torch_scores = detector.score_samples_torch(torch.tensor(features))
        np.testing.assert_allclose(torch_scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert np.ptp(atd) > 1e-3 and np.ptp(ctw) > 1e-3  # the scores vary: the check is not vacuous
    assert not np.allclose(atd, ctw)


def test_ctw_reads_the_predicted_class_and_atd_weighs_all_of_them() -> None:
    """Two classes in 2-D, cosines written down: ATD and CTW by the formulas, to 1e-12."""
    yes = np.array([[1.0, 0.0], [0.0, 1.0]])
    no = np.array([[0.6, 0.8], [0.8, 0.6]])  # unit rows
    features = np.array([[0.8, 0.6], [0.0, 1.0]])
    scale = 10.0
    cos_yes, cos_no = features @ yes.T, features @ no.T  # the features are unit rows too
    p_yes = 1 / (1 + np.exp(-scale * (cos_yes - cos_no)))
    softmax = np.exp(scale * cos_yes) / np.exp(scale * cos_yes).sum(axis=1, keepdims=True)
    arrays = {"class_embeddings": yes, "no_class_embeddings": no, "logit_scale": scale}
    atd = create_detector("clipn-atd", **arrays).fit(features).score_samples(features)
    ctw_detector = create_detector("clipn-ctw", **arrays).fit(features)
    np.testing.assert_allclose(atd, (p_yes * softmax).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(ctw_detector.score_samples(features), p_yes[[0, 1], [0, 1]])
    np.testing.assert_array_equal(ctw_detector.predict(features), [0, 1])
    np.testing.assert_allclose(ctw_detector.yes_probabilities(features), p_yes, rtol=1e-12)


def test_clipn_detectors_refuse_mismatched_no_embeddings() -> None:
    yes = np.eye(3, 4)
    with pytest.raises(InvalidParameterError) as error:
        create_detector("clipn-atd", class_embeddings=yes, no_class_embeddings=np.eye(2, 4)).fit(
            np.ones((2, 4))
        )
    assert str(error.value) == (
        "no_class_embeddings has shape (2, 4) but class_embeddings has (3, 4); compute both from "
        "the same class names (one no embedding per class, from CLIPN's no text encoder)"
    )
    with pytest.raises(InvalidParameterError, match="needs class_embeddings, no_class_embeddings"):
        create_detector("clipn-ctw")
    with pytest.raises(InvalidParameterError) as error:
        create_detector("clipn-ctw", class_embeddings=yes, no_class_embeddings=yes, logit_scale=0)
    assert (
        str(error.value) == "detector 'clipn-ctw': logit_scale must be a finite number > 0, got 0"
    )


# -- the detector contract (tests/detectors/test_contract.py's checks, on these two) ----------

CLIPN_NAMES = ["clipn-atd", "clipn-ctw"]


def clipn_factory(name: str, data: ClusterData) -> Detector:
    """Yes = the class directions, no = the OOD cluster's direction (cos 0.5 to each class).

    ``logit_scale`` 10: these cosines differ by 0.5-1 (CLIP's by 0.05-0.1, whence CLIPN's
    100); at 100 both sigmoids saturate and fp16 gradients underflow to zero.
    """
    no = np.tile(data.class_means.sum(axis=0), (data.n_classes, 1))
    return create_detector(
        name, class_embeddings=data.class_means, no_class_embeddings=no, logit_scale=10.0
    )


@pytest.fixture(scope="module")
def cluster_data() -> ClusterData:
    return make_cluster_data()


@pytest.fixture(scope="module")
def make_detector(cluster_data: ClusterData) -> Callable[[str], Detector]:
    return lambda name: clipn_factory(name, cluster_data)


@pytest.mark.parametrize("name", CLIPN_NAMES)
def test_clipn_detectors_keep_the_detector_contract(
    name: str,
    make_detector: Callable[[str], Detector],
    cluster_data: ClusterData,
    tmp_path: Path,
) -> None:
    assert DETECTORS[name].differentiable and DETECTORS[name].requires_text
    contract.test_fit_returns_self_and_scores_are_finite_float64(name, make_detector, cluster_data)
    contract.test_inputs_are_not_modified(name, make_detector, cluster_data)
    contract.test_score_before_fit_raises_not_fitted(name, make_detector, cluster_data)
    fitted = contract.fit(make_detector(name), cluster_data)
    contract.test_scores_are_deterministic_across_calls_and_fits(fitted, cluster_data)
    contract.test_save_load_round_trip_gives_identical_scores(fitted, cluster_data, tmp_path)
    contract.test_clone_and_get_params_round_trip(fitted)
    contract.test_higher_scores_mean_in_distribution(fitted, cluster_data)
    contract.test_wrong_dimensionality_and_nan_are_rejected(fitted, cluster_data)
    contract.test_every_parameter_has_constraints_and_param_info_lists_the_user_ones(name)
    contract.test_check_params_accepts_the_defaults(name)
    contract.test_check_params_refuses_an_unknown_name_in_one_exact_line(name)
    contract.test_check_params_refuses_a_wrong_type_naming_detector_parameter_and_value(
        name, "logit_scale"
    )
    contract.test_runner_parameters_are_refused_from_users_and_accepted_from_the_runner(
        name, cluster_data
    )
    contract.test_fit_validates_with_the_same_check(name, make_detector, cluster_data)
    for device in contract.DEVICES:  # cuda too, where there is one
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            contract.test_torch_scores_are_finite_close_and_differentiable_in_half_precision(
                name, dtype, device, make_detector, cluster_data
            )


def test_clipn_detector_file_keeps_both_embeddings_and_the_projection(
    encoder: CLIPNEncoder, tmp_path: Path
) -> None:
    features = encoder(pixels())["features"].detach().numpy()
    assert encoder.image_projection is not None
    detector = create_detector(
        "clipn-atd",
        class_embeddings=compute_class_embeddings(encoder, CLASS_NAMES, PROMPTS),
        no_class_embeddings=compute_no_class_embeddings(encoder, CLASS_NAMES, PROMPTS),
        image_projection=encoder.image_projection.numpy(),
        logit_scale=50.0,
    ).fit(features)
    loaded = load_detector(detector.save(tmp_path / "clipn.safetensors"))
    assert loaded.get_params()["logit_scale"] == 50.0
    np.testing.assert_array_equal(loaded.score_samples(features), detector.score_samples(features))
