"""Tests of the synthetic label corruption transforms."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.data.corruption import (
    MODELS,
    PRESETS,
    RandAddBlobLabeld,
    RandAffineLabeld,
    RandDropComponentLabeld,
    RandElasticLabeld,
    RandErodeDilateLabeld,
    RandLabelCorruptiond,
    RandMarkovNoiseLabeld,
    RandMixedCorruptiond,
    add_blob,
    affine_label,
    apply_per_class,
    ball,
    drop_components,
    elastic_label,
    make_corruption,
    markov_noise,
    morph_per_class,
)

SHAPE = (20, 20, 20)


def make_label() -> np.ndarray:
    """Two touching classes: a ball of class 1 next to a box of class 2, with background around them."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:13, 4:15, 4:15][ball(5)] = 1
    label[13:18, 6:14, 6:14] = 2
    return label


def changed(out: np.ndarray, label: np.ndarray) -> np.ndarray:
    return np.asarray(out) != label


def test_ball_is_symmetric_ball():
    for radius in range(4):
        b = ball(radius)
        assert b.dtype == bool and b.shape == (2 * radius + 1,) * 3
        assert b[radius, radius, radius] and b[0, radius, radius] and b[0, 0, 0] == (radius == 0)
        assert np.array_equal(b, b[::-1]) and np.array_equal(b, b.transpose(1, 2, 0))
    assert ball(0).sum() == 1 and ball(1).sum() == 7


def test_erosion_never_adds_foreground():
    label = make_label()
    out = morph_per_class(label, "erode", 2)
    assert out.dtype == label.dtype
    assert np.all((out == label) | (out == 0))
    assert changed(out, label).any()


def test_dilation_only_grows_into_background():
    label = make_label()
    out = morph_per_class(label, "dilate", 2)
    assert out.dtype == label.dtype
    assert np.array_equal(out[label != 0], label[label != 0])
    assert changed(out, label).any()
    assert set(np.unique(out)) <= set(np.unique(label))


def test_dilation_tie_goes_to_lower_class():
    label = np.zeros(SHAPE, np.uint8)
    label[5:15, 5:15, :9] = 1
    label[5:15, 5:15, 10:] = 2
    out = morph_per_class(label, "dilate", 1)
    assert np.all(out[5:15, 5:15, 9] == 1)


def test_erosion_keeps_structures_at_the_border():
    label = np.ones(SHAPE, np.uint8)
    assert np.array_equal(morph_per_class(label, "erode", 3), label)


@pytest.mark.parametrize("operation", ["erode", "dilate"])
def test_larger_radius_changes_more(operation):
    label = make_label()
    counts = [changed(morph_per_class(label, operation, r), label).sum() for r in range(5)]
    assert counts[0] == 0
    assert all(a <= b for a, b in itertools.pairwise(counts)) and counts[-1] > counts[1]


def test_channel_first_matches_spatial():
    label = make_label()
    for operation in ("erode", "dilate"):
        assert np.array_equal(morph_per_class(label[None], operation, 2)[0], morph_per_class(label, operation, 2))


def test_morph_per_class_rejects_bad_input():
    with pytest.raises(ValueError, match="open"):
        morph_per_class(make_label(), "open", 1)
    with pytest.raises(ValueError, match="shape"):
        morph_per_class(np.zeros((4, 4)), "erode", 1)


def run(transform: RandErodeDilateLabeld, label, n: int) -> list[tuple]:
    """Outputs and random choices of ``n`` calls."""
    results = []
    for _ in range(n):
        d = transform({"label": label})
        results.append(
            (
                np.asarray(d["label"]),
                np.asarray(d["corruption_mask"]),
                transform._do_transform,
                transform._operation,
                transform._radius,
            )
        )
    return results


def test_deterministic_per_seed():
    label = make_label()
    first = run(RandErodeDilateLabeld(prob=0.5).set_random_state(3), label, 12)
    second = run(RandErodeDilateLabeld(prob=0.5).set_random_state(3), label, 12)
    other = run(RandErodeDilateLabeld(prob=0.5).set_random_state(4), label, 12)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
    assert [a[2:] for a in first] != [a[2:] for a in other]


def test_outputs_are_valid_and_mask_is_exact():
    label = make_label()
    transform = RandErodeDilateLabeld(prob=0.7, radius=(1, 3)).set_random_state(0)
    for out, mask, do_transform, operation, radius in run(transform, label, 20):
        assert out.dtype == label.dtype and mask.dtype == np.uint8 and mask.shape == label.shape
        assert set(np.unique(out)) <= set(np.unique(label))
        assert np.array_equal(mask, changed(out, label).astype(np.uint8))
        assert operation in ("erode", "dilate") and 1 <= radius <= 3
        assert mask.any() == do_transform


def test_prob_zero_never_changes_and_prob_one_always_changes():
    label = make_label()
    for out, mask, *_ in run(RandErodeDilateLabeld(prob=0.0).set_random_state(0), label, 20):
        assert np.array_equal(out, label) and not mask.any()
    for _out, mask, *_ in run(RandErodeDilateLabeld(prob=1.0).set_random_state(0), label, 20):
        assert mask.any()


def test_fraction_of_corrupted_cases_matches_prob():
    label = make_label()
    prob, n = 0.3, 200
    transform = RandErodeDilateLabeld(prob=prob, radius=(1, 1)).set_random_state(1)
    count = sum(mask.any() for _, mask, *_ in run(transform, label, n))
    assert abs(count - prob * n) <= 4 * np.sqrt(n * prob * (1 - prob))


def test_operation_and_radius_are_drawn_from_their_ranges():
    transform = RandErodeDilateLabeld(prob=1.0, radius=(1, 3)).set_random_state(2)
    choices = {choice[3:] for choice in run(transform, make_label()[6:14, 6:14, 6:14], 60)}
    assert choices == {(op, r) for op in ("erode", "dilate") for r in (1, 2, 3)}


@pytest.mark.parametrize("to_type", [np.asarray, torch.as_tensor, lambda x: MetaTensor(torch.as_tensor(x).float())])
@pytest.mark.parametrize("channel", [False, True])
def test_numpy_and_torch_inputs(to_type, channel):
    label = make_label()[None] if channel else make_label()
    reference = run(RandErodeDilateLabeld(prob=0.8).set_random_state(5), label, 6)
    data = to_type(label)
    transform = RandErodeDilateLabeld(prob=0.8).set_random_state(5)
    for expected in reference:
        d = transform({"label": data, "image": "untouched"})
        assert type(d["label"]) is type(data) and d["label"].dtype == data.dtype
        assert type(d["corruption_mask"]) is type(data) and d["corruption_mask"].shape == data.shape
        assert d["image"] == "untouched"
        assert np.array_equal(np.asarray(d["label"]), expected[0])
        assert np.array_equal(np.asarray(d["corruption_mask"]), expected[1])
    mask_dtype = d["corruption_mask"].dtype
    assert mask_dtype in (np.uint8, torch.uint8)


def test_several_keys_and_missing_keys():
    label = make_label()
    transform = RandErodeDilateLabeld(keys=["a", "b"], prob=1.0, mask_key=["mask_a", "mask_b"]).set_random_state(0)
    d = transform({"a": label, "b": label.copy()})
    assert np.array_equal(d["a"], d["b"]) and np.array_equal(d["mask_a"], d["mask_b"]) and d["mask_a"].any()
    with pytest.raises(KeyError):
        transform({"a": label})
    transform = RandErodeDilateLabeld(keys=["a", "b"], mask_key=["mask_a", "mask_b"], allow_missing_keys=True)
    assert set(transform({"a": label})) == {"a", "mask_a"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prob": -0.1}, "prob"),
        ({"prob": 1.5}, "prob"),
        ({"radius": (3, 1)}, "radius"),
        ({"radius": (-1, 2)}, "radius"),
        ({"radius": (1.5, 2)}, "radius"),
        ({"radius": (1, 2, 3)}, "radius"),
        ({"keys": ["a", "b"], "mask_key": "mask"}, "mask_key"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandErodeDilateLabeld(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# core functions of the other noise models


def make_components_label() -> np.ndarray:
    """Class 1 as three separate balls of different sizes and class 2 as a box touching the largest ball."""
    label = make_label()
    label[3:8, 15:20, 3:8][ball(2)] = 1
    label[14:17, 15:18, 15:18][ball(1)] = 1
    return label


def test_ball_norms():
    assert ball(2, np.inf).all() and ball(2, np.inf).shape == (5, 5, 5)
    assert ball(2, 1).sum() == 25 and ball(1, 1).sum() == 7
    assert np.array_equal(ball(3), ball(3, 2))


@pytest.mark.parametrize("norm, structure", [(np.inf, np.ones((3, 3, 3))), (1, None)])
def test_cube_and_octahedron_equal_iterated_steps(norm, structure):
    """A cube (octahedron) of radius r is r steps of a 26- (6-) connected dilation, as in MTCL (PyMIC)."""
    label = make_label()
    expected = ndimage.binary_dilation(label == 1, structure, iterations=2) & (label != 2)
    assert np.array_equal(morph_per_class(label, "dilate", 2, norm=norm) == 1, expected)


def test_apply_per_class_merge_rules():
    label = make_label()
    out = apply_per_class(label, np.logical_not)
    # every class loses all its voxels and gains all the background, which the lower class wins
    assert np.array_equal(out, np.where(label == 0, 1, 0).astype(label.dtype))


def test_markov_noise_with_certain_flips_is_morphology():
    mask = make_label() == 1
    rng = np.random.RandomState(0)
    grown = markov_noise(mask, [True] * 3, flip_prob=1.0, noise_prob=0.0, sigma=0.0, rng=rng)
    assert np.array_equal(grown, ndimage.binary_dilation(mask, iterations=3))
    shrunk = markov_noise(mask, [False] * 2, flip_prob=1.0, noise_prob=0.0, sigma=0.0, rng=rng)
    assert np.array_equal(shrunk, ndimage.binary_erosion(mask, iterations=2, border_value=1))
    full = np.ones(SHAPE, bool)
    assert markov_noise(full, [False] * 3, flip_prob=1.0, noise_prob=0.0, sigma=0.0, rng=rng).all()


def test_markov_noise_flips_voxels_and_blur_removes_isolated_flips():
    mask = make_label() == 1
    rng = np.random.RandomState(0)
    assert np.array_equal(markov_noise(mask, [], 0.05, noise_prob=1.0, sigma=0.0, rng=rng), ~mask)
    assert not np.array_equal(markov_noise(mask, [], 0.05, noise_prob=0.1, sigma=0.0, rng=rng), mask)
    blurred = markov_noise(mask, [], 0.05, noise_prob=0.1, sigma=1.0, rng=rng)
    assert (blurred != mask).sum() < 0.01 * mask.size


def test_affine_label_translates_and_rotates():
    label = np.zeros(SHAPE, np.uint8)
    label[4:16, 6:14, 8:12] = 1
    shifted = affine_label(label, [2.0, -1.0, 0.6], [0.0, 0.0, 0.0])
    assert np.array_equal(shifted, ndimage.shift(label, (2, -1, 1), order=0, mode="nearest"))
    rotated = affine_label(label, [0.0, 0.0, 0.0], [90.0, 0.0, 0.0])  # about the box centre: y and z swap
    expected = np.zeros_like(label)
    expected[4:16, 8:12, 6:14] = 1
    assert np.array_equal(rotated, expected)
    small = np.zeros(SHAPE, np.uint8)
    small[8:12, 8:12, 8:12] = 2
    assert (affine_label(small, [0.0] * 3, [0.0] * 3, scale=2.0) == 2).sum() == 8**3
    empty = np.zeros(SHAPE, np.uint8)
    assert np.array_equal(affine_label(empty, [1.0, 0.0, 0.0], [10.0, 0.0, 0.0]), empty)


def test_drop_components_removes_whole_components():
    label = make_components_label()
    components = [(value, ndimage.label(label == value, np.ones((3, 3, 3)))) for value in np.unique(label[label != 0])]
    expected = [parts == index for value, (parts, count) in components for index in range(1, count + 1)]
    assert len(expected) == 4
    seen = set()
    for seed in range(30):
        out = drop_components(label, 1, np.random.RandomState(seed))
        dropped = changed(out, label)
        matches = [i for i, component in enumerate(expected) if np.array_equal(dropped, component)]
        assert len(matches) == 1 and np.all(out[dropped] == 0)
        seen.update(matches)
    assert seen == set(range(4))
    assert not drop_components(label, 10, np.random.RandomState(0)).any()


def test_add_blob_paints_a_separate_blob_of_one_class():
    label = make_label()
    for seed in range(10):
        radii = np.random.RandomState(seed).uniform(1, 3, size=3)
        out = add_blob(label, radii, np.random.RandomState(seed))
        blob = changed(out, label)
        assert blob.any() and np.all(label[blob] == 0)
        assert len(np.unique(out[blob])) == 1 and out[blob][0] in (1, 2)
        assert blob.sum() <= 4 / 3 * np.pi * np.prod(radii + 1)
        assert not (ndimage.binary_dilation(blob) & (label != 0)).any()  # not touching another structure
    assert not add_blob(np.zeros(SHAPE, np.uint8), [2, 2, 2], np.random.RandomState(0)).any()
    full = np.ones(SHAPE, np.uint8)
    assert np.array_equal(add_blob(full, [2, 2, 2], np.random.RandomState(0)), full)


def test_elastic_label_follows_the_displacement_field():
    label = make_label()
    assert np.array_equal(elastic_label(label, np.zeros((3, 4, 4, 4))), label)
    grid = np.zeros((3, 5, 5, 5))
    grid[0] = 1.0  # a constant field is a translation
    assert np.array_equal(elastic_label(label, grid), ndimage.shift(label, (-1, 0, 0), order=0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------------------
# transforms: properties every noise model shares

MODELS_UNDER_TEST = {
    "erode_dilate": partial(RandErodeDilateLabeld, radius=(1, 2)),
    "markov": partial(RandMarkovNoiseLabeld, steps=20),
    "affine": partial(RandAffineLabeld, shift=(1.0, 2.0), rotation=(0.0, 10.0)),
    "drop_component": RandDropComponentLabeld,
    "add_blob": partial(RandAddBlobLabeld, radius=(1.0, 3.0)),
    "elastic": partial(RandElasticLabeld, magnitude=(1.0, 2.0), points=4),
    "mixed": lambda **kwargs: RandMixedCorruptiond(
        [RandErodeDilateLabeld(prob=1.0), RandAddBlobLabeld(prob=1.0), RandAffineLabeld(prob=1.0)], **kwargs
    ),
}
# models that corrupt each class separately and never turn one class into another
PER_CLASS_MODELS = ("erode_dilate", "markov", "drop_component", "add_blob")


def outputs(transform: RandLabelCorruptiond, label, n: int) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Label, corruption mask and ``_do_transform`` of ``n`` calls."""
    results = []
    for _ in range(n):
        d = transform({"label": label})
        results.append((np.asarray(d["label"]), np.asarray(d["corruption_mask"]), transform._do_transform))
    return results


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_model_deterministic_per_seed(model):
    label = make_components_label()
    first = outputs(MODELS_UNDER_TEST[model](prob=0.8).set_random_state(3), label, 8)
    second = outputs(MODELS_UNDER_TEST[model](prob=0.8).set_random_state(3), label, 8)
    other = outputs(MODELS_UNDER_TEST[model](prob=0.8).set_random_state(4), label, 8)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_model_outputs_are_valid_and_mask_is_exact(model):
    label = make_components_label()
    for out, mask, do_transform in outputs(MODELS_UNDER_TEST[model](prob=0.7).set_random_state(0), label, 12):
        assert out.dtype == label.dtype and mask.dtype == np.uint8 and mask.shape == label.shape
        assert set(np.unique(out)) <= set(np.unique(label))
        assert np.array_equal(mask, changed(out, label).astype(np.uint8))
        assert mask.any() == do_transform


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_model_fraction_of_corrupted_cases_matches_prob(model):
    prob, n = 0.3, 200
    results = outputs(MODELS_UNDER_TEST[model](prob=prob).set_random_state(1), make_label(), n)
    count = sum(mask.any() for _, mask, _ in results)
    assert abs(count - prob * n) <= 4 * np.sqrt(n * prob * (1 - prob))
    assert all(mask.any() == do_transform for _, mask, do_transform in results)
    assert not any(mask.any() for _, mask, _ in outputs(MODELS_UNDER_TEST[model](prob=0.0), make_label(), 5))


@pytest.mark.parametrize("model", PER_CLASS_MODELS)
def test_model_never_turns_one_class_into_another(model):
    label = make_components_label()
    for out, *_ in outputs(MODELS_UNDER_TEST[model](prob=1.0).set_random_state(0), label, 10):
        assert np.all((out == label) | (out == 0) | (label == 0))


@pytest.mark.parametrize(
    "make, values",
    [
        (RandErodeDilateLabeld, [{"radius": (r, r)} for r in (1, 2, 3)]),
        (RandMarkovNoiseLabeld, [{"steps": t} for t in (5, 20, 60)]),
        (partial(RandAffineLabeld, rotation=(0.0, 0.0)), [{"shift": (s, s)} for s in (1.0, 2.0, 3.0)]),
        (partial(RandAffineLabeld, shift=(0.0, 0.0)), [{"rotation": (a, a)} for a in (5.0, 15.0, 30.0)]),
        (RandDropComponentLabeld, [{"num_components": (n, n)} for n in (1, 2, 3)]),
        (RandAddBlobLabeld, [{"radius": (r, r)} for r in (1.0, 2.0, 3.0)]),
        (RandElasticLabeld, [{"magnitude": (m, m)} for m in (0.5, 1.5, 3.0)]),
    ],
)
def test_strength_increases_changed_voxels(make, values):
    """The mean number of changed voxels over 20 seeds strictly increases with the strength."""
    label = make_components_label()
    means = []
    for kwargs in values:
        counts = [outputs(make(prob=1.0, **kwargs).set_random_state(seed), label, 1)[0][1].sum() for seed in range(20)]
        means.append(np.mean(counts))
    assert means[0] > 0 and means[0] < means[1] < means[2]


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
@pytest.mark.parametrize("to_type", [torch.as_tensor, lambda x: MetaTensor(torch.as_tensor(x).float())])
@pytest.mark.parametrize("channel", [False, True])
def test_model_torch_inputs_match_numpy(model, to_type, channel):
    label = make_label()
    reference = outputs(MODELS_UNDER_TEST[model](prob=0.8).set_random_state(5), label, 3)
    data = to_type(label[None] if channel else label)
    transform = MODELS_UNDER_TEST[model](prob=0.8).set_random_state(5)
    for expected in reference:
        d = transform({"label": data})
        assert type(d["label"]) is type(data) and d["label"].dtype == data.dtype
        assert type(d["corruption_mask"]) is type(data) and d["corruption_mask"].dtype == torch.uint8
        out, mask = np.asarray(d["label"]), np.asarray(d["corruption_mask"])
        assert out.shape == mask.shape == data.shape
        assert np.array_equal(out[0] if channel else out, expected[0])
        assert np.array_equal(mask[0] if channel else mask, expected[1])


def test_random_choices_are_drawn_from_their_ranges():
    markov = RandMarkovNoiseLabeld(steps=50, expand_prob=0.7).set_random_state(0)
    affine = RandAffineLabeld(shift=(1.0, 2.0), rotation=(3.0, 6.0), scale=(0.9, 1.1)).set_random_state(0)
    drop = RandDropComponentLabeld(num_components=(1, 3)).set_random_state(0)
    blob = RandAddBlobLabeld(radius=(1.5, 2.5)).set_random_state(0)
    elastic = RandElasticLabeld(magnitude=(1.0, 2.0), points=3).set_random_state(0)
    expand, drops = [], set()
    for _ in range(40):
        for transform in (markov, affine, drop, blob, elastic):
            transform.randomize()
        expand.append(markov._expand)
        assert markov._expand.shape == (50,)
        assert 1.0 <= np.linalg.norm(affine._shift) <= 2.0 and 3.0 <= np.linalg.norm(affine._rotation) <= 6.0
        assert 0.9 <= affine._scale <= 1.1
        drops.add(drop._num_components)
        assert np.all((1.5 <= blob._radii) & (blob._radii <= 2.5))
        assert 1.0 <= elastic._magnitude <= 2.0 and elastic._grid.shape == (3, 3, 3, 3)
    assert drops == {1, 2, 3}
    assert abs(np.mean(expand) - 0.7) < 0.05


def test_channels_are_corrupted_separately_with_the_same_choice():
    label = np.stack([make_label(), make_components_label()])
    transform = RandDropComponentLabeld(prob=1.0).set_random_state(0)
    out = transform({"label": label})["label"]
    for channel in range(2):
        assert np.array_equal(out[channel], transform.corrupt(label[channel]))
    with pytest.raises(ValueError, match="shape"):
        transform({"label": np.zeros((4, 4))})


# ---------------------------------------------------------------------------------------------------------------------
# mixing models


def test_mixed_picks_models_by_weight():
    erode = RandErodeDilateLabeld(prob=1.0)
    blob = RandAddBlobLabeld(prob=1.0)
    transform = RandMixedCorruptiond([erode, blob], weights=[3, 1], prob=1.0).set_random_state(0)
    label = make_label()
    indices = []
    for _ in range(200):
        out = transform({"label": label})["label"]
        indices.append(transform._index)
        assert np.array_equal(out, (erode, blob)[transform._index].corrupt(label))
    assert abs(np.mean(indices) - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / 200)
    only_first = RandMixedCorruptiond([erode, blob], weights=[1, 0], prob=1.0).set_random_state(0)
    outputs(only_first, label, 10)
    assert only_first._index == 0


def test_mixed_chain_applies_all_models_in_order():
    members = [RandErodeDilateLabeld(prob=1.0), RandAffineLabeld(prob=1.0, shift=(2.0, 2.0))]
    transform = RandMixedCorruptiond(members, chain=True, prob=1.0).set_random_state(0)
    label = make_label()
    for _ in range(5):
        d = transform({"label": label})
        assert np.array_equal(d["label"], members[1].corrupt(members[0].corrupt(label)))
        assert np.array_equal(d["corruption_mask"], changed(d["label"], label))


def test_mixed_respects_the_models_own_prob():
    transform = RandMixedCorruptiond([RandAddBlobLabeld(prob=0.0)], prob=1.0).set_random_state(0)
    assert not any(mask.any() for _, mask, _ in outputs(transform, make_label(), 5))


# ---------------------------------------------------------------------------------------------------------------------
# presets and factory


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_and_run(name):
    label = make_label()
    transform = make_corruption(name, prob=1.0, keys="seg", mask_key="noise").set_random_state(0)
    for _ in range(2):
        d = transform({"seg": label})
        assert d["seg"].dtype == label.dtype and set(np.unique(d["seg"])) <= set(np.unique(label))
        assert np.array_equal(d["noise"], changed(d["seg"], label)) and d["noise"].any()
    assert make_corruption(name).prob == PRESETS[name].get("prob", 1.0)


def test_preset_settings_and_overrides():
    b1 = make_corruption("spatial_correction_B1")
    assert isinstance(b1, RandMarkovNoiseLabeld) and b1.prob == 1.0
    assert (b1.steps, b1.expand_prob, b1.flip_prob, b1.noise_prob, b1.sigma) == (80, 0.7, 0.05, 0.0, 1.0)
    assert make_corruption("spatial_correction_B2").expand_prob == 0.3
    mtcl = make_corruption("mtcl_la", prob=0.5, radius=(1, 2))
    assert isinstance(mtcl, RandErodeDilateLabeld) and mtcl.prob == 0.5 and mtcl.radius == (1, 2)
    assert mtcl.norm == np.inf and PRESETS["mtcl_la"]["radius"] == (1, 7)
    rmd = make_corruption("rmd_lidc")
    assert rmd.chain and [type(c) for c in rmd.corruptions] == [RandElasticLabeld, RandAffineLabeld]
    assert all(c.prob == 1.0 for c in rmd.corruptions)
    mixed = make_corruption("mixed")
    assert not mixed.chain and len({type(c) for c in mixed.corruptions}) == len(MODELS)


def test_make_corruption_from_spec():
    blob = make_corruption({"model": "add_blob", "radius": (1.0, 2.0)}, prob=0.2)
    assert isinstance(blob, RandAddBlobLabeld) and blob.prob == 0.2 and blob.radius == (1.0, 2.0)
    members = [{"model": "elastic"}, {"model": "drop_component", "prob": 0.5}]
    mix = make_corruption({"one_of": members, "weights": [1, 3]})
    assert mix.prob == 1.0 and np.allclose(mix.weights, [0.25, 0.75]) and mix.corruptions[1].prob == 0.5


@pytest.mark.parametrize(
    "spec, match",
    [
        ("spatial_correction_X9", "preset"),
        ({"model": "blur"}, "model"),
        ({"radius": (1, 2)}, "spec"),
        ({"model": "markov", "steps": -1}, "steps"),
    ],
)
def test_make_corruption_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        make_corruption(spec)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (RandErodeDilateLabeld, {"norm": 0.5}, "norm"),
        (RandMarkovNoiseLabeld, {"prob": 2.0}, "prob"),
        (RandMarkovNoiseLabeld, {"steps": 2.5}, "steps"),
        (RandMarkovNoiseLabeld, {"expand_prob": 1.5}, "expand_prob"),
        (RandMarkovNoiseLabeld, {"flip_prob": -0.1}, "flip_prob"),
        (RandMarkovNoiseLabeld, {"noise_prob": True}, "noise_prob"),
        (RandMarkovNoiseLabeld, {"sigma": -1.0}, "sigma"),
        (RandAffineLabeld, {"shift": (2.0, 1.0)}, "shift"),
        (RandAffineLabeld, {"rotation": (0.0, 200.0)}, r"rotation .* 0 <= min <= max <= 180"),
        (RandAffineLabeld, {"scale": (0.0, 1.0)}, "scale"),
        (RandDropComponentLabeld, {"num_components": (1.0, 2.0)}, "num_components"),
        (RandAddBlobLabeld, {"radius": (0.5, 2.0)}, r"radius .* 1 <= min"),
        (RandElasticLabeld, {"magnitude": 3.0}, "magnitude"),
        (RandElasticLabeld, {"points": 1}, r"points must be an integer >= 2, got 1"),
        (RandElasticLabeld, {"keys": ["a", "b"], "mask_key": "m"}, "mask_key"),
        (partial(RandMixedCorruptiond, []), {}, "corruptions"),
        (partial(RandMixedCorruptiond, [RandErodeDilateLabeld()]), {"weights": [1, 2]}, "weights"),
        (partial(RandMixedCorruptiond, [RandErodeDilateLabeld()]), {"weights": [0]}, "weights"),
        (partial(RandMixedCorruptiond, [RandErodeDilateLabeld()]), {"weights": [-1]}, "weights"),
        (partial(RandMixedCorruptiond, [RandErodeDilateLabeld()]), {"weights": [1], "chain": True}, "chain"),
        (partial(RandMixedCorruptiond, ["erode"]), {}, "corruptions"),
    ],
)
def test_new_models_argument_validation(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
