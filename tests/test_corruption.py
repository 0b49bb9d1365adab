"""Tests of the synthetic label corruption transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.corruption import RandErodeDilateLabeld, ball, morph_per_class

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
    assert all(a <= b for a, b in zip(counts, counts[1:])) and counts[-1] > counts[1]


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
        results.append((np.asarray(d["label"]), np.asarray(d["corruption_mask"]), transform._do_transform,
                        transform._operation, transform._radius))
    return results


def test_deterministic_per_seed():
    label = make_label()
    first = run(RandErodeDilateLabeld(prob=0.5).set_random_state(3), label, 12)
    second = run(RandErodeDilateLabeld(prob=0.5).set_random_state(3), label, 12)
    other = run(RandErodeDilateLabeld(prob=0.5).set_random_state(4), label, 12)
    for a, b in zip(first, second):
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
    for out, mask, *_ in run(RandErodeDilateLabeld(prob=1.0).set_random_state(0), label, 20):
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
