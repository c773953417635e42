"""Tests for graders.threat_model: distances on the 0-255 scale and the exact eps check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from graders.errors import SubmissionRejected
from graders.threat_model import Norm, ThreatModel, check_threat_model, distances

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_names(n: int) -> list[str]:
    return [f"{i:04d}_{CLASSES[i % len(CLASSES)]}.png" for i in range(n)]


def make_clean(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# ThreatModel


def test_threat_model_converts_str_norm_to_enum_and_eps_to_float() -> None:
    tm = ThreatModel("linf", 8)  # type: ignore[arg-type]
    assert tm.norm is Norm.LINF
    assert isinstance(tm.eps, float) and tm.eps == 8.0
    assert tm.eps_unit == pytest.approx(8 / 255)
    assert ThreatModel(Norm.L2, 127.5).eps_unit == pytest.approx(0.5)


@pytest.mark.parametrize("eps", [0, -1, float("nan"), float("inf"), -float("inf")])
def test_threat_model_rejects_non_positive_or_non_finite_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        ThreatModel(Norm.LINF, eps)


@pytest.mark.parametrize("eps", ["8", None, True])
def test_threat_model_rejects_non_numeric_eps(eps: object) -> None:
    with pytest.raises(TypeError, match="eps"):
        ThreatModel(Norm.LINF, eps)  # type: ignore[arg-type]


def test_threat_model_rejects_unknown_norm_listing_accepted_ones() -> None:
    with pytest.raises(ValueError, match="'linf', 'l2'"):
        ThreatModel("l1", 8)  # type: ignore[arg-type]


def test_threat_model_is_frozen() -> None:
    tm = ThreatModel(Norm.LINF, 8)
    with pytest.raises(AttributeError):
        tm.eps = 16  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# distances


def test_linf_distance_does_not_wrap_around_in_uint8() -> None:
    clean = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    adv = clean.copy()
    adv[0, 0, 0, 0] = 255  # uint8 subtraction 0 - 255 would wrap to 1
    clean[1, 5, 5, 2] = 200
    adv[1, 5, 5, 2] = 190
    np.testing.assert_array_equal(distances(clean, adv, Norm.LINF), [255.0, 10.0])
    np.testing.assert_array_equal(distances(adv, clean, Norm.LINF), [255.0, 10.0])


def test_l2_distance_is_euclidean_norm_of_whole_image() -> None:
    clean = make_clean(3)
    adv = clean.copy()
    adv[0, 0, 0, 0] = clean[0, 0, 0, 0] ^ 0xFF  # a large single-channel change
    adv[2, :, :, 1] = 255 - clean[2, :, :, 1]
    expected = np.linalg.norm(
        (adv.astype(np.float64) - clean.astype(np.float64)).reshape(3, -1), axis=1
    )
    np.testing.assert_allclose(distances(clean, adv, Norm.L2), expected, rtol=1e-12)
    assert distances(clean, adv, Norm.L2)[1] == 0.0


def test_distances_refuse_mismatched_or_non_uint8_arrays() -> None:
    clean = make_clean(2)
    with pytest.raises(ValueError, match="shape"):
        distances(clean, make_clean(3), Norm.LINF)
    with pytest.raises(ValueError, match="uint8"):
        distances(clean, clean.astype(np.float32), Norm.LINF)
    with pytest.raises(ValueError, match="uint8"):
        distances(clean.transpose(0, 3, 1, 2), clean.transpose(0, 3, 1, 2), Norm.LINF)


# ---------------------------------------------------------------------------------------------
# check_threat_model


def test_perturbation_exactly_at_eps_passes_and_returns_distances() -> None:
    clean = np.full((3, 32, 32, 3), 100, dtype=np.uint8)
    adv = clean.copy()
    adv[0] += 8
    adv[1, 3, 4, 0] -= 8
    dist = check_threat_model(clean, adv, ThreatModel(Norm.LINF, 8), make_names(3))
    np.testing.assert_array_equal(dist, [8, 8, 0])


def test_one_channel_at_eps_plus_one_is_rejected_with_worst_first() -> None:
    clean = np.full((500, 32, 32, 3), 100, dtype=np.uint8)
    adv = clean.copy()
    names = make_names(500)
    adv[3, 0, 0, 0] = 109  # distance 9
    adv[7, 1, 1, 1] = 80  # distance 20, the worst
    adv[9, 2, 2, 2] = 108  # distance 8, allowed
    with pytest.raises(SubmissionRejected) as info:
        check_threat_model(clean, adv, ThreatModel(Norm.LINF, 8), names)
    err = info.value
    assert err.code == "threat_model_violated"
    assert err.status == 422
    assert err.details == {
        "norm": "linf",
        "eps": 8.0,
        "violations": [
            {"image": "0007_horse.png", "distance": 20},
            {"image": "0003_cat.png", "distance": 9},
        ],
        "violation_count": 2,
    }
    assert "2 of 500 images are outside the L-inf threat model" in err.message
    assert "eps = 8 on the 0-255 scale" in err.message
    assert "the worst is 0007_horse.png at distance 20" in err.message
    assert "[-8, 8]" in err.message
    json.dumps(err.details)


def test_violation_list_is_capped_but_count_is_total() -> None:
    clean = make_clean(30)
    adv = clean.astype(np.int16)
    adv[:, 0, 0, 0] = np.where(clean[:, 0, 0, 0] > 127, 0, 255)  # every image far out
    adv[5, 0, 0, 0] = 255 if clean[5, 0, 0, 0] < 128 else 0
    with pytest.raises(SubmissionRejected) as info:
        check_threat_model(
            clean, adv.astype(np.uint8), ThreatModel(Norm.LINF, 8), make_names(30), max_listed=4
        )
    details = info.value.details
    assert details["violation_count"] == 30
    assert len(details["violations"]) == 4
    listed = [v["distance"] for v in details["violations"]]
    assert listed == sorted(listed, reverse=True)
    assert all(isinstance(d, int) for d in listed)


def test_l2_check_allows_rounding_slack_only() -> None:
    clean = np.full((2, 32, 32, 3), 100, dtype=np.uint8)
    adv = clean.copy()
    adv[0, 0, 0, :] = 103  # sqrt(27)
    adv[1, 0, 0, :] = 104  # sqrt(48)
    eps = float(np.sqrt(27.0))
    dist = check_threat_model(clean[:1], adv[:1], ThreatModel(Norm.L2, eps), ["a.png"])
    assert dist[0] == pytest.approx(eps)
    # Rounding the eps down by far less than the slack still passes ...
    check_threat_model(clean[:1], adv[:1], ThreatModel(Norm.L2, eps * (1 - 1e-9)), ["a.png"])
    # ... but 1e-5 too little does not.
    with pytest.raises(SubmissionRejected) as info:
        check_threat_model(clean, adv, ThreatModel(Norm.L2, eps * (1 - 1e-5)), ["a.png", "b.png"])
    err = info.value
    assert err.code == "threat_model_violated"
    assert err.details["norm"] == "l2"
    assert [v["image"] for v in err.details["violations"]] == ["b.png", "a.png"]
    assert err.details["violations"][0]["distance"] == pytest.approx(np.sqrt(48.0), abs=1e-4)
    assert "L2 threat model" in err.message and "the worst is b.png" in err.message


def test_single_violation_message_is_grammatical() -> None:
    clean = make_clean(2)
    adv = clean.copy()
    adv[1, 0, 0, 0] = 0 if clean[1, 0, 0, 0] > 127 else 255
    with pytest.raises(SubmissionRejected, match="1 of 2 images is outside"):
        check_threat_model(clean, adv, ThreatModel(Norm.LINF, 8), make_names(2))


def test_names_must_match_batch_size() -> None:
    clean = make_clean(2)
    with pytest.raises(ValueError, match="names"):
        check_threat_model(clean, clean, ThreatModel(Norm.LINF, 8), ["only_one.png"])


# ---------------------------------------------------------------------------------------------
# Properties

clean_batches = hnp.arrays(
    np.uint8, st.tuples(st.integers(1, 3), st.just(32), st.just(32), st.just(3))
)


@settings(max_examples=50, deadline=None)
@given(clean=clean_batches, eps=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_any_perturbation_clipped_to_eps_passes(clean: np.ndarray, eps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    delta = rng.integers(-3 * eps, 3 * eps + 1, clean.shape)
    adv = np.clip(clean.astype(np.int32) + np.clip(delta, -eps, eps), 0, 255).astype(np.uint8)
    dist = check_threat_model(clean, adv, ThreatModel(Norm.LINF, eps), make_names(len(clean)))
    assert dist.shape == (len(clean),)
    assert (dist <= eps).all()


@settings(max_examples=50, deadline=None)
@given(
    clean=clean_batches,
    eps=st.integers(1, 16),
    where=st.tuples(st.integers(0, 2), st.integers(0, 31), st.integers(0, 31), st.integers(0, 2)),
)
def test_one_channel_at_eps_plus_one_fails_and_is_listed(
    clean: np.ndarray, eps: int, where: tuple[int, int, int, int]
) -> None:
    i, y, x, c = where
    i %= len(clean)
    adv = clean.copy()
    value = int(clean[i, y, x, c])
    adv[i, y, x, c] = value + eps + 1 if value + eps + 1 <= 255 else value - eps - 1
    names = make_names(len(clean))
    with pytest.raises(SubmissionRejected) as info:
        check_threat_model(clean, adv, ThreatModel(Norm.LINF, eps), names)
    assert info.value.code == "threat_model_violated"
    assert info.value.details["violations"] == [{"image": names[i], "distance": eps + 1}]
