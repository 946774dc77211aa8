"""HER2 label rules: ASCO/CAP 2018 (affirmed 2023) IHC + ISH -> zero / low / positive, and binary.

The dataset stores the raw fields (IHC score, ISH result, binary her2); a task label is derived
from them when the dataset is read, so one prepared dataset serves both schemes. A case whose
label cannot be derived is not an error: ``derive_label`` returns ``None`` with the reason.
A value that is not a valid IHC / ISH / her2 entry at all *is* an error (a bad table).
"""

from __future__ import annotations

import math

from her2jax.errors import Her2jaxError

SCHEMES = ("her2_3class", "her2_binary")
CLASS_NAMES = {
    "her2_3class": ("HER2-zero", "HER2-low", "HER2-positive"),
    "her2_binary": ("HER2-negative", "HER2-positive"),
}
IHC_SCORES = ("0", "1+", "2+", "3+")
ISH_RESULTS = ("negative", "positive")

# "<na>" / "nat": how pandas' NA and NaT print (nullable and datetime columns).
_MISSING = {"", "nan", "na", "n/a", "none", "null", "missing", "unknown", "-", "not done",
            "<na>", "nat"}
_IHC_ALIASES = {
    "0": "0", "0+": "0", "ultralow": "0", "0 ultralow": "0",
    "1": "1+", "1+": "1+", "+": "1+",
    "2": "2+", "2+": "2+", "++": "2+",
    "3": "3+", "3+": "3+", "+++": "3+",
}
_ISH_ALIASES = {
    "positive": "positive", "pos": "positive", "amplified": "positive", "+": "positive",
    "1": "positive", "yes": "positive", "true": "positive",
    "negative": "negative", "neg": "negative", "not amplified": "negative",
    "non-amplified": "negative", "-ve": "negative", "0": "negative", "no": "negative",
    "false": "negative",
}


def _clean(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip().lower()
    if text.endswith(".0") and text[:-2].isdigit():  # spreadsheets turn 1 into 1.0
        text = text[:-2]
    return "" if text in _MISSING else text


def normalize_ihc(value, *, patient: str | None = None) -> str:
    """Returns '' (missing) or one of '0', '1+', '2+', '3+'; raises on anything else."""
    text = _clean(value)
    if text.startswith("ihc"):
        text = text[3:].strip()
    if not text:
        return ""
    if text not in _IHC_ALIASES:
        raise Her2jaxError(f"unknown IHC score {value!r} (expected 0, 1+, 2+ or 3+)",
                           patient=patient, key="ihc")
    return _IHC_ALIASES[text]


def normalize_ish(value, *, patient: str | None = None) -> str:
    """Returns '' (missing / not done), 'negative' or 'positive'; raises on anything else."""
    text = _clean(value)
    if not text:
        return ""
    if text not in _ISH_ALIASES:
        raise Her2jaxError(f"unknown ISH result {value!r} (expected positive, negative or empty)",
                           patient=patient, key="ish")
    return _ISH_ALIASES[text]


def normalize_her2(value, *, patient: str | None = None) -> int:
    """Binary HER2 status as stored: -1 (missing), 0 (negative) or 1 (positive)."""
    text = _clean(value)
    if not text:
        return -1
    if text in ("1", "positive", "pos", "yes", "true"):
        return 1
    if text in ("0", "negative", "neg", "no", "false"):
        return 0
    raise Her2jaxError(f"unknown binary her2 value {value!r} (expected 1, 0 or empty)",
                       patient=patient, key="her2")


def three_class(ihc: str, ish: str) -> tuple[int | None, str]:
    """ASCO/CAP: 0 -> zero; 1+ or 2+/ISH- -> low; 2+/ISH+ or 3+ -> positive.

    Args:
      ihc: normalised IHC score ('' when missing).
      ish: normalised ISH result ('' when missing).

    Returns:
      (class index into CLASS_NAMES['her2_3class'], '') or (None, reason).
    """
    if ihc == "":
        return None, "IHC score missing"
    if ihc == "0":
        return 0, ""
    if ihc == "1+":
        return 1, ""
    if ihc == "3+":
        return 2, ""
    if ish == "negative":
        return 1, ""
    if ish == "positive":
        return 2, ""
    return None, "IHC 2+ without ISH result: HER2 category undetermined"


def binary(ihc: str, ish: str, her2: int) -> tuple[int | None, str]:
    """Positive vs negative: the recorded binary her2 when present, otherwise from IHC / ISH."""
    if her2 in (0, 1):
        return her2, ""
    label, reason = three_class(ihc, ish)
    if label is None:
        return None, f"binary her2 missing and {reason}"
    return int(label == 2), ""


def derive_label(scheme: str, ihc: str, ish: str, her2: int) -> tuple[int | None, str]:
    """The task label of one case under ``scheme``, or (None, why it cannot be derived)."""
    if scheme == "her2_3class":
        return three_class(ihc, ish)
    if scheme == "her2_binary":
        return binary(ihc, ish, her2)
    raise Her2jaxError(f"unknown label scheme {scheme!r} (expected one of {', '.join(SCHEMES)})",
                       key="scheme")
