"""Properties of the upload validators against independent oracles: which arrays read_batch
accepts (and what it makes of them), which batches the threat model admits, and that a defense
manifest is either valid or refused with a SubmissionRejected, whatever JSON or form text it is."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graders.architectures import Architecture
from graders.batch_formats import BatchLimits, read_batch
from graders.defense_models import DefenseManifest, parse_manifest, parse_manifest_json
from graders.errors import SubmissionRejected
from graders.threat_model import L2_RELATIVE_SLACK, Norm, ThreatModel, check_threat_model

N = 2
NAMES = [f"{i:04d}_cat.png" for i in range(N)]
LIMITS = BatchLimits.for_batch(N)
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = ["u1", "i1", "u2", "i8", "f2", "f4", "f8", ">f4", "?", "c8"]
SHAPES = [
    (N, 32, 32, 3),
    (N, 3, 32, 32),
    (N + 1, 32, 32, 3),
    (N - 1, 3, 32, 32),
    (N, 32, 32),
    (N, 32, 3, 32),
    (N, 3, 32, 32, 1),
    (0, 32, 32, 3),
]
FLOAT_SPECIALS = [0.0, 1.0, 0.5, -1e-9, 1.0 + 1e-6, 255.0, math.nan, math.inf, -math.inf]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of many dtypes and shapes (a third in each accepted layout), random values,
    sometimes with a few special ones."""
    layout = draw(st.sampled_from(["uint8 HWC", "float CHW", "any"]))
    if layout == "uint8 HWC":
        dtype, shape = np.dtype("u1"), SHAPES[0]
    elif layout == "float CHW":
        dtype, shape = np.dtype(draw(st.sampled_from(["f2", "f4", "f8", ">f4"]))), SHAPES[1]
    else:
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        high = draw(st.sampled_from([1.0, 1.0, 1.0, 2.0]))
        array = (rng.random(shape) * high).astype(dtype)
        for value in draw(st.lists(st.sampled_from(FLOAT_SPECIALS), max_size=2)):
            if array.size:
                array.flat[rng.integers(array.size)] = value
        return array
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind == "c":
        return rng.random(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -300), min(info.max, 300), shape, endpoint=True).astype(dtype)


def oracle(array: np.ndarray) -> np.ndarray | str:
    """What read_batch must return for ``array``, or the kind of refusal."""
    if array.dtype == np.uint8 and array.shape == (N, 32, 32, 3):
        return array
    if array.dtype.kind == "f" and array.shape == (N, 3, 32, 32):
        wide = array.astype(np.float64)
        if not np.isfinite(wide).all():
            return "non_finite_values"
        if wide.min() < 0 or wide.max() > 1:
            return "values_out_of_range"
        return np.rint(wide * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return "layout"


@FAST
@given(array=arrays(), container=st.sampled_from(["npy", "npz"]))
def test_read_batch_accepts_exactly_the_two_layouts(
    scratch: Path, array: np.ndarray, container: str
) -> None:
    buffer = io.BytesIO()
    if container == "npy":
        np.save(buffer, array, allow_pickle=False)
    else:
        np.savez(buffer, images=array)
    path = scratch / "upload.bin"
    path.write_bytes(buffer.getvalue())
    expected = oracle(array)
    try:
        batch = read_batch(path, f"adv.{container}", expected_names=NAMES, limits=LIMITS)
    except SubmissionRejected as err:
        assert isinstance(expected, str), f"refused a valid array: {err.code}: {err.message}"
        layout = {"wrong_dtype", "wrong_shape", "wrong_count", "wrong_layout"}
        assert err.code in layout if expected == "layout" else err.code == expected
        assert err.status == 422 and err.message
        json.dumps(err.details)
    else:
        assert not isinstance(expected, str), f"accepted an array it must refuse ({expected})"
        assert batch.dtype == np.uint8 and batch.flags.c_contiguous
        np.testing.assert_array_equal(batch, expected)


@st.composite
def perturbed_batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, ThreatModel]:
    """A clean batch, an adversarial one whose images move by different amounts (some inside
    the ball, some outside), and a threat model."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clean = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    reach = np.array(draw(st.lists(st.integers(0, 24), min_size=4, max_size=4)))
    delta = rng.integers(-24, 25, clean.shape) % (reach[:, None, None, None] + 1)
    signs = rng.choice(np.array([-1, 1]), clean.shape)
    adv = np.clip(clean.astype(np.int64) + signs * delta, 0, 255).astype(np.uint8)
    norm = draw(st.sampled_from(list(Norm)))
    if norm is Norm.LINF:
        eps = draw(st.one_of(st.integers(1, 24), st.floats(0.5, 24.5)))
    else:
        eps = draw(st.floats(1.0, 1500.0))
    return clean, adv, ThreatModel(norm, eps)


@settings(max_examples=200, deadline=None)
@given(case=perturbed_batches())
def test_threat_model_admits_exactly_the_batches_inside_the_ball(
    case: tuple[np.ndarray, np.ndarray, ThreatModel],
) -> None:
    clean, adv, threat = case
    diff = adv.astype(np.int64) - clean.astype(np.int64)
    names = [f"{i:04d}_dog.png" for i in range(len(clean))]
    if threat.norm is Norm.LINF:
        outside = [int(np.abs(d).max()) > threat.eps for d in diff]
    else:  # exact integer sums of squares against eps^2, with the documented rounding slack
        squares = [int((d * d).sum()) for d in diff]
        assume(all(abs(math.sqrt(s) - threat.eps) > 1e-5 * threat.eps for s in squares))
        outside = [s > (threat.eps * (1 + L2_RELATIVE_SLACK)) ** 2 for s in squares]
    try:
        distances = check_threat_model(clean, adv, threat, names)
    except SubmissionRejected as err:
        assert any(outside), "refused a batch inside the threat model"
        assert err.code == "threat_model_violated"
        assert err.details["violation_count"] == sum(outside)
        listed = {v["image"] for v in err.details["violations"]}
        assert listed == {name for name, out in zip(names, outside, strict=True) if out}
    else:
        assert not any(outside), "admitted a batch outside the threat model"
        assert distances.shape == (len(clean),)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["resnet20", "ResNet20 ", "resnet56", "none", "cifar10", "0,0,0"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["architecture", "normalization", "mean", "std", "extra"]) | st.text(),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
ALLOWED = [Architecture.RESNET20]


def check_manifest(build: object) -> None:
    """``build()`` returns a manifest that obeys the phase, or raises a 422 SubmissionRejected."""
    try:
        manifest = build()  # type: ignore[operator]
    except SubmissionRejected as err:
        assert err.code in {"invalid_manifest", "architecture_not_allowed"}
        assert err.status == 422 and err.message
        json.dumps(err.details)
    else:
        assert isinstance(manifest, DefenseManifest)
        assert manifest.architecture in ALLOWED
        assert all(math.isfinite(v) for v in (*manifest.mean, *manifest.std))
        assert all(v > 0 for v in manifest.std)


@FAST
@given(
    document=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {"architecture": st.sampled_from(["resnet20", "resnet56", "x"])},
            optional={"normalization": JSON_VALUES, "mean": JSON_VALUES, "std": JSON_VALUES},
        ),
    )
)
def test_parse_manifest_json_takes_any_json(document: object) -> None:
    check_manifest(lambda: parse_manifest_json(json.dumps(document).encode(), allowed=ALLOWED))


@FAST
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_manifest_json_takes_any_bytes(raw: bytes) -> None:
    check_manifest(lambda: parse_manifest_json(raw, allowed=ALLOWED))


NUMBER_TEXT = st.lists(
    st.sampled_from(["0", "1", "0.5", "-1", "nan", "inf", "1e309", "", " ", "x", "1_0"]),
    max_size=4,
).map(",".join)


@FAST
@given(
    architecture=st.none() | st.sampled_from(["resnet20", " RESNET20", "resnet56"]) | st.text(),
    normalization=st.none() | st.sampled_from(["none", "cifar10", "Cifar10 "]) | st.text(),
    mean=st.none() | NUMBER_TEXT | st.text(),
    std=st.none() | NUMBER_TEXT | st.text(),
)
def test_parse_manifest_takes_any_form_fields(
    architecture: str | None, normalization: str | None, mean: str | None, std: str | None
) -> None:
    check_manifest(
        lambda: parse_manifest(
            architecture=architecture,
            normalization=normalization,
            mean=mean,
            std=std,
            allowed=ALLOWED,
        )
    )
