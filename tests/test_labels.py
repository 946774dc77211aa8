"""HER2 label rules: the ASCO/CAP table of REFERENCE.md, the binary scheme, value aliases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from her2jax import labels
from her2jax.errors import Her2jaxError

ZERO, LOW, POS = 0, 1, 2


@pytest.mark.parametrize("ihc, ish, expected", [
    ("0", "", ZERO),
    ("0", "negative", ZERO),
    ("1+", "", LOW),
    ("1+", "negative", LOW),
    ("2+", "negative", LOW),
    ("2+", "positive", POS),
    ("3+", "", POS),
    ("3+", "negative", POS),
])
def test_three_class_asco_cap_table(ihc, ish, expected):
    label, reason = labels.derive_label("her2_3class", ihc, ish, -1)
    assert label == expected
    assert reason == ""
    assert labels.CLASS_NAMES["her2_3class"][label] == (
        "HER2-zero", "HER2-low", "HER2-positive")[expected]


def test_three_class_2plus_without_ish_is_undetermined():
    label, reason = labels.derive_label("her2_3class", "2+", "", -1)
    assert label is None
    assert "2+" in reason and "ISH" in reason


def test_three_class_missing_ihc_is_undetermined_even_with_binary_her2():
    label, reason = labels.derive_label("her2_3class", "", "positive", 1)
    assert label is None
    assert "IHC" in reason


@pytest.mark.parametrize("ihc, ish, her2, expected", [
    ("3+", "", 0, 0),          # the recorded binary value wins
    ("0", "", 1, 1),
    ("", "", 1, 1),
    ("", "", 0, 0),
    ("3+", "", -1, 1),         # else derived from IHC / ISH
    ("2+", "positive", -1, 1),
    ("2+", "negative", -1, 0),
    ("1+", "", -1, 0),
    ("0", "", -1, 0),
])
def test_binary(ihc, ish, her2, expected):
    assert labels.derive_label("her2_binary", ihc, ish, her2) == (expected, "")


@pytest.mark.parametrize("ihc, ish", [("2+", ""), ("", ""), ("", "positive")])
def test_binary_undetermined(ihc, ish):
    label, reason = labels.derive_label("her2_binary", ihc, ish, -1)
    assert label is None
    assert reason.startswith("binary her2 missing")


@pytest.mark.parametrize("value, expected", [
    ("0", "0"), (0, "0"), (0.0, "0"), ("0+", "0"), ("ultralow", "0"),
    (1, "1+"), (1.0, "1+"), ("1", "1+"), ("1+", "1+"), ("IHC 1+", "1+"),
    ("2", "2+"), (2.0, "2+"), ("IHC 2+", "2+"), ("ihc2+", "2+"), (" 2+ ", "2+"), ("++", "2+"),
    ("3+", "3+"), (np.float64(3.0), "3+"), ("+++", "3+"),
    (float("nan"), ""), (None, ""), ("", ""), ("NA", ""), ("n/a", ""), ("unknown", ""),
])
def test_ihc_aliases(value, expected):
    assert labels.normalize_ihc(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("amplified", "positive"), ("Amplified", "positive"), ("pos", "positive"), (1, "positive"),
    (1.0, "positive"), ("positive", "positive"),
    ("not amplified", "negative"), ("Negative", "negative"), (0, "negative"), ("neg", "negative"),
    (float("nan"), ""), ("", ""), ("not done", ""),
])
def test_ish_aliases(value, expected):
    assert labels.normalize_ish(value) == expected


@pytest.mark.parametrize("value, expected", [
    (1.0, 1), (0.0, 0), (1, 1), ("1", 1), ("0.0", 0), ("Positive", 1), ("neg", 0),
    (float("nan"), -1), (np.nan, -1), (None, -1), ("", -1), (True, 1), (False, 0),
])
def test_her2_aliases(value, expected):
    assert labels.normalize_her2(value) == expected


def test_pandas_missing_values_are_missing():
    pd = pytest.importorskip("pandas")
    assert labels.normalize_ihc(pd.NA) == ""
    assert labels.normalize_ish(pd.NA) == ""
    assert labels.normalize_her2(pd.NA) == -1
    assert labels.normalize_her2(pd.NaT) == -1


@pytest.mark.parametrize("fn, value, key", [
    (labels.normalize_ihc, "4+", "ihc"),
    (labels.normalize_ihc, "positive", "ihc"),
    (labels.normalize_ihc, 2.5, "ihc"),
    (labels.normalize_ish, "equivocal", "ish"),
    (labels.normalize_ish, "2+", "ish"),
    (labels.normalize_her2, "maybe", "her2"),
    (labels.normalize_her2, 2, "her2"),
    (labels.normalize_her2, "2+", "her2"),
])
def test_unknown_values_raise(fn, value, key):
    with pytest.raises(Her2jaxError) as info:
        fn(value, patient="P9")
    err = info.value
    assert err.patient == "P9" and err.key == key
    assert repr(value) in str(err) or str(value) in str(err)
    assert "\n" not in str(err)


def test_unknown_scheme_raises():
    with pytest.raises(Her2jaxError, match="unknown label scheme"):
        labels.derive_label("her2_4class", "0", "", -1)


IHC_VALUES = st.sampled_from(["", "0", "1+", "2+", "3+"])
ISH_VALUES = st.sampled_from(["", "negative", "positive"])
HER2_VALUES = st.sampled_from([-1, 0, 1])


@given(IHC_VALUES, ISH_VALUES, HER2_VALUES)
def test_three_class_defined_iff_ihc_known_and_not_bare_2plus(ihc, ish, her2):
    label, reason = labels.derive_label("her2_3class", ihc, ish, her2)
    undetermined = ihc == "" or (ihc == "2+" and ish == "")
    assert (label is None) == undetermined
    assert (reason != "") == undetermined
    if label is not None:
        assert label in (ZERO, LOW, POS)


@given(IHC_VALUES, ISH_VALUES)
def test_binary_agrees_with_three_class_when_her2_missing(ihc, ish):
    three, _ = labels.derive_label("her2_3class", ihc, ish, -1)
    two, _ = labels.derive_label("her2_binary", ihc, ish, -1)
    if three is None:
        assert two is None
    else:
        assert two == int(three == POS)


@given(IHC_VALUES, ISH_VALUES, st.sampled_from([0, 1]))
def test_binary_recorded_value_always_wins(ihc, ish, her2):
    assert labels.derive_label("her2_binary", ihc, ish, her2) == (her2, "")


@given(st.one_of(st.text(max_size=8), st.floats(allow_nan=True), st.integers(-5, 5),
                 st.none()))
def test_normalisers_return_canonical_or_raise(value):
    for fn, allowed in ((labels.normalize_ihc, {"", *labels.IHC_SCORES}),
                        (labels.normalize_ish, {"", *labels.ISH_RESULTS}),
                        (labels.normalize_her2, {-1, 0, 1})):
        try:
            out = fn(value)
        except Her2jaxError as e:
            assert "\n" not in str(e)
            continue
        assert out in allowed
        if isinstance(value, float) and math.isnan(value):
            assert out in ("", -1)
