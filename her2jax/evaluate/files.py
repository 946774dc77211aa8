"""The evaluation files: ``predictions.csv`` and ``metrics.json`` (public names, never renamed).

``predictions.csv`` columns, in this order: ``patient_id``, ``center``, ``label`` (the class
name; empty when unknown), one ``prob_<class name>`` column per class in class order, then the
clinical columns given, in the given order. Probabilities are written with ``repr`` (the
shortest text that reads back to the same float64), so they round-trip exactly.

``metrics.json`` is ``metrics.summarize``'s dict as JSON (indent 2); NaN and infinities are
written as ``null``. Both files are written atomically (a temporary file in the same folder,
then a rename), so a reader never sees half a file. Written files get the mode ``open()`` would
give them (``0o666`` less the umask; the console scripts set a umask of at least ``0o027``), not
``tempfile.mkstemp``'s ``0o600``, so the group a site shares results with can read them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from her2jax import fileio
from her2jax.errors import Her2jaxError

PREDICTION_COLUMNS = ("patient_id", "center", "label")
PROB_PREFIX = "prob_"
# How far a row's probabilities may sum from 1 (float32 softmax written as float64 is ~1e-7 off;
# logits or scores are far off). The same tolerance as metrics.summarize.
PROB_SUM_TOLERANCE = 1e-3


# The file-I/O primitives live in her2jax.fileio.
write_text = fileio.write_text


def write_figure(path: str | os.PathLike, fig, **savefig) -> None:
    """Saves a matplotlib figure as PNG, atomically (a killed run never leaves a truncated
    image)."""
    fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig))


def _cell(value) -> str:
    """A clinical value as CSV text: missing (None, NaN, pandas NA) is empty."""
    if value is None:
        return ""
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):  # pd.isna of a list-like: not a missing scalar
        pass
    return str(value)


def write_predictions(path: str | os.PathLike, *, patient_ids: Sequence[str],
                      centers: Sequence[str], labels: Sequence[int] | np.ndarray,
                      probs: np.ndarray, class_names: Sequence[str],
                      clinical: dict[str, Sequence[str]] | None = None) -> None:
    """Writes ``predictions.csv`` atomically.

    Args:
      path: the file to write (its folder is created).
      patient_ids: [N] patient ids.
      centers: [N] centre names.
      labels: [N] int class indices, -1 when the label is unknown (written as empty).
      probs: [N, K] float predicted probabilities, columns in ``class_names`` order.
      class_names: K class names; column ``prob_<name>`` per class.
      clinical: optional ``{column: [N] values}`` written last, in the given order; missing
        values (None, NaN) are written empty.

    Raises:
      Her2jaxError: lengths or shapes disagree, a label is out of range, or a clinical column
        name clashes with another column.
    """
    class_names = [str(name) for name in class_names]
    k = len(class_names)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(patient_ids)
    clinical = dict(clinical or {})
    if probs.shape != (n, k):
        raise Her2jaxError(f"probs must be [{n}, {k}] (patients x classes), got {probs.shape}",
                           file=path, key="probs")
    for key, column in [("centers", centers), ("labels", labels), *clinical.items()]:
        if len(column) != n:
            raise Her2jaxError(f"{len(column)} values for {n} patients", file=path, key=key)
    bad = (labels < -1) | (labels >= k)
    if bad.any():
        raise Her2jaxError(f"labels must be -1 (unknown) or in [0, {k}); "
                           f"found {sorted(set(labels[bad].tolist()))}", file=path, key="labels")
    header = [*PREDICTION_COLUMNS, *(PROB_PREFIX + name for name in class_names), *clinical]
    if len(set(header)) != len(header):
        duplicates = sorted({c for c in header if header.count(c) > 1})
        raise Her2jaxError(f"duplicate column names {duplicates}", file=path, key="clinical")

    rows = []
    for i in range(n):
        label = class_names[labels[i]] if labels[i] >= 0 else ""
        rows.append([str(patient_ids[i]), str(centers[i]), label,
                     *(repr(float(p)) for p in probs[i]),
                     *(_cell(column[i]) for column in clinical.values())])
    write_text(path, _csv_text([header, *rows]))


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Reads ``predictions.csv``.

    Returns:
      A DataFrame with the file's columns in order: ``patient_id``, ``center``, ``label`` and the
      clinical columns as strings (empty when missing or unknown; ids keep leading zeros), the
      ``prob_<class>`` columns as float64. ``class_names_of(frame)`` gives the classes.

    Raises:
      Her2jaxError: naming the file: it is missing or unreadable, a required column is
        missing or duplicated, a probability is not a number in [0, 1] (NaN, a logit), a row's
        probabilities do not sum to 1, or a label is not a class name.
    """
    path = pathlib.Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), None)
    except FileNotFoundError:
        raise Her2jaxError("predictions file not found", file=path) from None
    except UnicodeDecodeError as e:
        raise _not_utf8(e, path) from None
    except OSError as e:
        raise Her2jaxError(f"cannot read predictions file: {e}", file=path) from None
    if not header:
        raise Her2jaxError("predictions file is empty (no header)", file=path)
    for column in PREDICTION_COLUMNS:
        if column not in header:
            raise Her2jaxError(f"missing column '{column}' (expected columns "
                               f"{', '.join(PREDICTION_COLUMNS)}, prob_<class>...)",
                               file=path, key=column)
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise Her2jaxError(f"duplicate columns {duplicates}", file=path)
    prob_columns = [c for c in header if c.startswith(PROB_PREFIX)]
    if not prob_columns:
        raise Her2jaxError(f"missing column '{PROB_PREFIX}<class>': no probability columns",
                           file=path, key=PROB_PREFIX)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                            encoding="utf-8")
    except UnicodeDecodeError as e:   # past the part read for the header
        raise _not_utf8(e, path) from None
    except pd.errors.ParserError as e:
        raise Her2jaxError(f"malformed predictions file: {e}", file=path) from None
    for column in prob_columns:
        try:
            frame[column] = frame[column].astype(np.float64)
        except ValueError:
            raise Her2jaxError("probabilities must be numbers", file=path, key=column) from None
    class_names = class_names_of(frame)
    unknown = sorted(set(frame["label"]) - {"", *class_names})
    if unknown:
        raise Her2jaxError(f"labels {unknown} are not classes ({', '.join(class_names)})",
                           file=path, key="label")
    _check_probabilities(frame, prob_columns, path)
    return frame


def _not_utf8(error: UnicodeDecodeError, path) -> Her2jaxError:
    # The decoder's offset counts from the chunk it was decoding, not the file: name the byte.
    return Her2jaxError(f"not UTF-8 text (byte 0x{error.object[error.start]:02x}); save the "
                        "predictions as UTF-8 CSV", file=path)


def _check_probabilities(frame: pd.DataFrame, prob_columns: list[str], path) -> None:
    """Every probability finite and in [0, 1], every row summing to 1 (within tolerance)."""
    probs = frame[prob_columns].to_numpy(dtype=np.float64)
    if not len(probs):
        return

    def where(row: int) -> str:   # CSV row 1 is the header
        return f"row {row + 2} (patient {frame['patient_id'].iloc[row]})"

    # Rounding may put a sure prediction a hair above 1; anything more is not a probability.
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1 + PROB_SUM_TOLERANCE)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = probs[row, col]
        what = "NaN" if np.isnan(value) else repr(float(value))
        n = int(bad.sum())
        raise Her2jaxError(f"{where(row)}: {what} is not a probability in [0, 1] ({n} bad "
                           f"value{'s' * (n != 1)}); pass probabilities, not logits",
                           file=path, key=prob_columns[col])
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        n = int(off.sum())
        raise Her2jaxError(f"{where(row)}: probabilities sum to {sums[row]:.6g}, not 1 ({n} "
                           f"row{'s' * (n != 1)} off); pass probabilities, not logits",
                           file=path)


def class_names_of(frame: pd.DataFrame) -> list[str]:
    """The class names of a predictions frame, in column order (from its ``prob_`` columns)."""
    return [c[len(PROB_PREFIX):] for c in frame.columns if c.startswith(PROB_PREFIX)]


def prediction_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(labels [N] int64 (-1 unknown), probs [N, K] float64, class_names)`` of a predictions frame.

    ``summarize`` wants labelled cases only: ``keep = labels >= 0``.
    """
    class_names = class_names_of(frame)
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(label, -1) for label in frame["label"]], dtype=np.int64)
    probs = frame[[PROB_PREFIX + name for name in class_names]].to_numpy(dtype=np.float64)
    return labels, probs, class_names


def _jsonable(value):
    """numpy scalars / arrays to Python, tuples to lists, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_metrics(path: str | os.PathLike, summary: dict) -> None:
    """Writes ``metrics.json`` atomically: indent 2, NaN / infinities as ``null``."""
    text = json.dumps(_jsonable(summary), indent=2, allow_nan=False, ensure_ascii=False)
    write_text(path, text + "\n")


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a training log (a workdir's ``metrics.jsonl``), in file order.

    Lines that are not a whole JSON object (the torn last line of a killed run, a blank line)
    are skipped; a missing file has no records.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> dict:
    """Reads ``metrics.json``; Her2jaxError naming the file when missing or not a JSON object."""
    path = pathlib.Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise Her2jaxError("metrics file not found", file=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Her2jaxError(f"cannot read metrics file: {e}", file=path) from None
    if not isinstance(data, dict):
        raise Her2jaxError("metrics file does not hold a JSON object", file=path)
    return data
