"""Reads and validates a cohort: which patients, which files, which raw labels.

Two layouts are read:

* **MAMA-MIA**: a folder with ``images/<pid>/<pid>_0000.nii.gz`` (phase k = ``<pid>_000k``,
  ``_00kk`` from 10 on; ``.nii`` also accepted), ``segmentations/expert/<pid>.nii.gz`` and a
  clinical table: ``clinical.csv`` in the folder, else MAMA-MIA's own
  ``clinical_and_imaging_info.xlsx`` (sheet ``dataset_info``). ``clinical.csv`` wins when both
  exist (it is where users put their own IHC / ISH labels). The path may also be the table
  itself (an ``.xlsx``; a ``.csv`` path is read as a manifest).
* **Manifest**: a CSV (the path, or ``manifest.csv`` in the folder, which wins over a MAMA-MIA
  layout in the same folder) with ``patient_id``, ``center``, ``phase_0``, ``phase_1``, ...,
  ``mask`` and the label columns. Relative paths resolve against the manifest's folder, the
  cohort root. A path that leaves the root (``..``, an absolute path elsewhere, a symlink
  pointing outside) is refused unless ``allow_outside_root``.

Only patients listed in the table are cases. An image folder without a table row is not an
error (a table may deliberately select a subset): it is ignored and listed in
``Cohort.unlisted``. Table-level problems (file missing, not UTF-8, wrong delimiter, duplicate
or missing columns, missing sheet, empty table) raise ``Her2jaxError`` at once; case-level
problems become ``Rejection``s and reading goes on. A case whose label cannot be derived
(IHC 2+ without ISH, her2 missing) is a valid case: labels are derived per scheme later.

Patient ids must be plain names (no path separator, no control character, not ``.``/``..``)
because they name files in the MAMA-MIA layout and in outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import stat
import zipfile

from her2jax import labels
from her2jax.errors import Her2jaxError

MANIFEST = "manifest.csv"
CLINICAL_CSV = "clinical.csv"
CLINICAL_XLSX = "clinical_and_imaging_info.xlsx"
CENTER_ALIASES = ("center", "centre", "dataset", "site")
_PHASE_COLUMN = re.compile(r"^phase_(\d+)$")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class Case:
    """One valid patient: files and raw (normalised) labels.

    ``phases`` are absolute paths, phase 0 = pre-contrast, in acquisition order; ``mask`` is
    absolute. ``ihc`` is '' | '0' | '1+' | '2+' | '3+'; ``ish`` '' | 'negative' | 'positive';
    ``her2`` -1 (missing) | 0 | 1. ``clinical`` holds (configured column name, value as text)
    for the configured clinical columns the table has, in configuration order.
    """

    patient_id: str
    center: str
    phases: tuple[pathlib.Path, ...]
    mask: pathlib.Path
    ihc: str
    ish: str
    her2: int
    clinical: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A patient that cannot be used, with the file concerned ('' if none) and why."""

    patient_id: str
    file: str
    reason: str

    def error(self) -> Her2jaxError:
        """The same rejection as the one-line user error."""
        return Her2jaxError(self.reason, patient=self.patient_id or None,
                            file=self.file or None)


@dataclasses.dataclass
class Cohort:
    """What ``read_cohort`` found. ``cases`` and ``rejected`` are sorted by patient_id."""

    root: pathlib.Path
    source: str                     # 'mamamia' or 'manifest'
    table: pathlib.Path             # the clinical table or manifest read
    cases: list[Case]
    rejected: list[Rejection]
    # Image folders (MAMA-MIA layout) with no row in the table: ignored, listed for the log.
    unlisted: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class _Table:
    path: pathlib.Path
    header: list[str]               # as written (trimmed)
    rows: list[tuple[int, list[str]]]   # (row number as the user sees it, cells as text)

    def index(self, name: str) -> int | None:
        wanted = name.strip().lower()
        for i, h in enumerate(self.header):
            if h.lower() == wanted:
                return i
        return None


def _cell_text(value) -> str:
    """A spreadsheet cell as text: NaN/None -> '', 1.0 -> '1', 1.5 -> '1.5'."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def _check_header(path: pathlib.Path, header: list[str]) -> None:
    seen: dict[str, int] = {}
    dups = []
    for i, name in enumerate(header):
        key = name.lower()
        if key in seen and key:
            dups.append(f"'{name}' (columns {seen[key] + 1} and {i + 1})")
        seen.setdefault(key, i)
    if dups:
        raise Her2jaxError(f"duplicate column names: {', '.join(dups)}", file=str(path))


def _read_csv(path: pathlib.Path) -> _Table:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise Her2jaxError("table file missing", file=str(path)) from e
    except OSError as e:
        raise Her2jaxError(f"cannot read table ({e.strerror or e})", file=str(path)) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Her2jaxError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                           "save the table as UTF-8 CSV", file=str(path)) from e
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = []
        header = None
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if header is None:
                header = cells
            else:
                rows.append((reader.line_num, cells))
    except csv.Error as e:
        raise Her2jaxError(f"malformed CSV ({e})", file=str(path)) from e
    if header is None:
        raise Her2jaxError("empty table (no header, no rows)", file=str(path))
    if len(header) == 1:
        for sep, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
            if sep in header[0]:
                raise Her2jaxError(f"expected comma-separated values, but the header is one "
                                   f"column containing {name}; save it with ',' as the "
                                   "delimiter", file=str(path))
    _check_header(path, header)
    for line, cells in rows:
        if len(cells) != len(header):
            raise Her2jaxError(f"row {line} has {len(cells)} fields but the header has "
                               f"{len(header)}", file=str(path))
    if not rows:
        raise Her2jaxError("empty table (a header but no rows)", file=str(path))
    return _Table(path, header, rows)


def _read_xlsx(path: pathlib.Path, sheet: str) -> _Table:
    import pandas as pd  # only needed for spreadsheets

    if not path.is_file():
        raise Her2jaxError("table file missing", file=str(path))
    try:
        with pd.ExcelFile(path, engine="openpyxl") as book:
            if sheet not in book.sheet_names:
                raise Her2jaxError(f"no sheet '{sheet}' (sheets: {', '.join(book.sheet_names)})",
                                   file=str(path))
            frame = pd.read_excel(book, sheet_name=sheet, header=None, dtype=object)
    except Her2jaxError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise Her2jaxError(f"not a readable .xlsx file ({type(e).__name__}: {e})",
                           file=str(path)) from e
    records = [[_cell_text(v) for v in row] for row in frame.itertuples(index=False)]
    numbered = [(i + 1, r) for i, r in enumerate(records) if any(r)]
    if not numbered:
        raise Her2jaxError(f"empty table (sheet '{sheet}' has no cells)", file=str(path))
    (_, header), rows = numbered[0], numbered[1:]
    _check_header(path, header)
    if not rows:
        raise Her2jaxError(f"empty table (sheet '{sheet}' has a header but no rows)",
                           file=str(path))
    return _Table(path, header, rows)


def _read_table(path: pathlib.Path, sheet: str) -> _Table:
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return _read_xlsx(path, sheet)
    return _read_csv(path)


# ----------------------------------------------------------------------------- columns

COLUMN_KEYS = ("patient_id", "center", "ihc", "ish", "her2")   # each one table column name
CLINICAL_KEY = "clinical"                                        # a list of column names


def check_columns(columns) -> None:
    """Checks the types of ``data.columns`` before any table is read.

    A mistyped override (``--config.data.columns.clinical=3``, which the config system turns
    into ``(3,)``) would otherwise name no column of any table and be dropped without a word.

    Args:
      columns: ``data_config().columns`` (ConfigDict or mapping).

    Raises:
      Her2jaxError: naming ``data.columns.<key>``: an unknown key, a name that is not text, or
        ``clinical`` not a list of names.
    """
    try:
        keys = list(columns.keys())
    except AttributeError:
        raise Her2jaxError(f"must map {', '.join(COLUMN_KEYS)} and {CLINICAL_KEY} to table "
                           f"column names, got {columns!r}", key="data.columns") from None
    for key in keys:
        if key not in (*COLUMN_KEYS, CLINICAL_KEY):
            raise Her2jaxError(f"unknown key (expected {', '.join(COLUMN_KEYS)} or "
                               f"{CLINICAL_KEY})", key=f"data.columns.{key}")
    for key in COLUMN_KEYS:
        value = _setting(columns, key, None)
        if value is not None and not isinstance(value, str):
            raise Her2jaxError(f"must be a column name (text, '' when the table has none), "
                               f"got {value!r} ({type(value).__name__})",
                               key=f"data.columns.{key}")
    clinical = _setting(columns, CLINICAL_KEY, ())
    if isinstance(clinical, str):
        return
    if not isinstance(clinical, list | tuple):
        raise Her2jaxError(f"must be a list of column names, got {clinical!r} "
                           f"({type(clinical).__name__})", key=f"data.columns.{CLINICAL_KEY}")
    for name in clinical:
        if not isinstance(name, str):
            raise Her2jaxError(f"must be a list of column names, got {tuple(clinical)!r}: "
                               f"{name!r} ({type(name).__name__}) is not a name",
                               key=f"data.columns.{CLINICAL_KEY}")


def _setting(columns, key: str, default=""):
    try:
        value = columns[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


@dataclasses.dataclass
class _Columns:
    patient_id: int
    center: int
    ihc: int | None
    ish: int | None
    her2: int | None
    clinical: list[tuple[str, int]]


def _resolve_columns(table: _Table, columns, require_labels: bool = True) -> _Columns:
    def find(key: str) -> int | None:
        name = str(_setting(columns, key)).strip()
        if not name:
            return None
        return table.index(name)

    missing = []
    pid_name = str(_setting(columns, "patient_id", "patient_id")).strip() or "patient_id"
    pid = table.index(pid_name)
    if pid is None:
        missing.append(f"'{pid_name}'")
    center_name = str(_setting(columns, "center", "center")).strip()
    center = None
    for name in dict.fromkeys([center_name, *CENTER_ALIASES]):
        if name and table.index(name) is not None:
            center = table.index(name)
            break
    if center is None:
        names = list(dict.fromkeys(n for n in [center_name, *CENTER_ALIASES] if n))
        missing.append(f"'{names[0]}'" + (f" (or {', '.join(repr(n) for n in names[1:])})"
                                          if len(names) > 1 else ""))
    ihc, ish, her2 = find("ihc"), find("ish"), find("her2")
    if ihc is None and her2 is None and require_labels:
        wanted = [f"'{_setting(columns, k)}'" for k in ("ihc", "her2") if _setting(columns, k)]
        missing.append("a label column: " + (" or ".join(wanted) if wanted else
                                             "none configured (columns.ihc / columns.her2)")
                       + "; her2jax-prepare --norequire_labels prepares an unlabelled cohort")
    if missing:
        raise Her2jaxError(f"missing required column(s): {'; '.join(missing)} "
                           f"(columns found: {', '.join(table.header)})", file=str(table.path))
    clinical_names = _setting(columns, "clinical", ())
    if isinstance(clinical_names, str):
        clinical_names = (clinical_names,) if clinical_names else ()
    clinical = [(str(n).strip(), table.index(str(n))) for n in clinical_names]
    return _Columns(pid, center, ihc, ish, her2,
                    [(n, i) for n, i in clinical if n and i is not None])


# ----------------------------------------------------------------------------- files

# Patient ids become file names (images/<id>/<id>_0000.nii.gz, <id>_shap_original.nii.gz,
# ...), and a file name holds at most 255 bytes: ids are capped well below, so that every name
# her2jax derives from one fits on any filesystem.
MAX_PATIENT_ID_BYTES = 128


def bad_patient_id(pid: str) -> str:
    """Why ``pid`` cannot name files (a path separator, a control character, '.' / '..', too
    long), or '' when it can."""
    if pid in (".", "..") or any(c in pid for c in "/\\") or any(
            ord(c) < 32 or ord(c) == 127 for c in pid):
        return (f"patient_id {pid!r} is not a plain name (contains a path separator or "
                "control character, or is '.' / '..')")
    size = len(pid.encode("utf-8", "surrogateescape"))
    if size > MAX_PATIENT_ID_BYTES:
        return (f"patient_id is {size} bytes long; her2jax names files after patient ids and "
                f"takes ids of up to {MAX_PATIENT_ID_BYTES} bytes")
    return ""


def _stat_problem(path: pathlib.Path) -> str:
    """'' when ``path`` is an existing regular file (following symlinks), else why not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot be opened ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _display(path: pathlib.Path, root: pathlib.Path) -> str:
    """The path relative to the root when inside it, else absolute."""
    text, base = os.path.normpath(path), os.path.normpath(root)
    return os.path.relpath(text, base) if _inside(text, base) else text


def _mamamia_files(root: pathlib.Path, pid: str) -> tuple[tuple[pathlib.Path, ...],
                                                          pathlib.Path | None, str, str]:
    """(phases, mask, file, reason): files of one patient; reason '' when all are there."""
    folder = root / "images" / pid
    pattern = re.compile(re.escape(pid) + r"_(\d{4,})(\.nii(?:\.gz)?)$")
    found: dict[int, list[pathlib.Path]] = {}
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        entries = None
    except OSError as e:
        return (), None, _display(folder, root), f"cannot list image folder ({e.strerror or e})"
    for name in entries or []:
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(folder / name)
    if entries is None or not found:
        where = "no folder images/" + pid if entries is None else "no phase files in it"
        return (), None, f"images/{pid}/{pid}_0000.nii.gz", f"missing phase file ({where})"
    phases = []
    suffix = ".nii.gz" if found[min(found)][0].name.endswith(".gz") else ".nii"
    for k in range(max(found) + 1):
        files = found.get(k)
        if not files:
            name = f"images/{pid}/{pid}_{k:04d}{suffix}"
            return (), None, name, (f"missing phase file (phase {k} of 0..{max(found)}; "
                                    "phases must be numbered contiguously from 0000)")
        if len(files) > 1:
            return (), None, _display(files[0], root), (
                f"two files for phase {k}: {', '.join(f.name for f in files)}")
        problem = _stat_problem(files[0])
        if problem:
            return (), None, _display(files[0], root), f"phase file {problem}"
        phases.append(files[0])
    masks = [root / "segmentations" / "expert" / (pid + s) for s in _NIFTI_SUFFIXES]
    present = [m for m in masks if _stat_problem(m) != "missing"]
    if not present:
        return (), None, f"segmentations/expert/{pid}.nii.gz", "missing mask file"
    if len(present) > 1:
        return (), None, _display(present[0], root), (
            f"two mask files: {', '.join(m.name for m in present)}")
    problem = _stat_problem(present[0])
    if problem:
        return (), None, _display(present[0], root), f"mask file {problem}"
    return tuple(phases), present[0], "", ""


def _manifest_path(cell: str, root: pathlib.Path, allow_outside: bool,
                   what: str) -> tuple[pathlib.Path | None, str, str]:
    """(absolute path, file, reason) of one manifest path cell; reason '' when usable."""
    raw = pathlib.Path(os.path.expanduser(cell))
    path = pathlib.Path(os.path.normpath(raw if raw.is_absolute() else root / raw))
    shown = _display(path, root)
    if not allow_outside and not _inside(str(path), os.path.normpath(root)):
        return None, cell, (f"{what} path {cell!r} leaves the cohort root {root} "
                            "(set allow_outside_root to permit)")
    problem = _stat_problem(path)
    if problem == "missing":
        return None, shown, f"missing {what} file"
    if problem:
        return None, shown, f"{what} file {problem}"
    if not allow_outside:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if not _inside(real, real_root):
            return None, shown, (f"{what} file is a symlink to {real}, outside the cohort root "
                                 f"{real_root} (set allow_outside_root to permit)")
    return path, shown, ""


# ----------------------------------------------------------------------------- reading

def _locate(path: pathlib.Path) -> tuple[str, pathlib.Path, pathlib.Path]:
    """(source, root, table) for a cohort path."""
    if not path.exists():
        raise Her2jaxError("cohort not found", file=str(path))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return "manifest", path.parent, path
        if suffix in (".xlsx", ".xlsm"):
            return "mamamia", path.parent, path
        raise Her2jaxError("a cohort is a folder, a manifest .csv or a clinical .xlsx",
                           file=str(path))
    if (path / MANIFEST).is_file():
        return "manifest", path, path / MANIFEST
    for name in (CLINICAL_CSV, CLINICAL_XLSX):
        if (path / name).is_file():
            return "mamamia", path, path / name
    raise Her2jaxError(f"not a cohort folder: expected {MANIFEST}, or images/ with "
                       f"{CLINICAL_CSV} or {CLINICAL_XLSX}", file=str(path))


def read_cohort(path, columns, *, clinical_sheet: str = "dataset_info",
                allow_outside_root: bool = False, require_labels: bool = True) -> Cohort:
    """Reads a cohort's table and checks every listed patient's files and label values.

    Args:
      path: a MAMA-MIA-layout folder, a folder with ``manifest.csv``, a manifest ``.csv``, or
        a MAMA-MIA clinical ``.xlsx`` beside ``images/``.
      columns: ``data_config().columns`` (ConfigDict or mapping): table column names of
        patient_id, center, ihc, ish, her2 ('' = not in the table) and the optional
        ``clinical`` columns. Matching is case-insensitive; ``center`` also accepts the
        aliases ``centre``, ``dataset`` (MAMA-MIA) and ``site``.
      clinical_sheet: the sheet read from an ``.xlsx`` table.
      allow_outside_root: let manifest paths leave the manifest's folder.
      require_labels: a table without any label column (IHC or binary her2) is an error;
        predict reads new, unlabelled cohorts with False.

    Returns:
      The Cohort: valid cases and rejections, each sorted by patient_id.

    Raises:
      Her2jaxError: the cohort or table is unusable as a whole (names the file and why), or
        ``columns`` holds a value of the wrong type (names the key).
    """
    check_columns(columns)
    path = pathlib.Path(os.path.abspath(os.path.expanduser(str(path))))
    source, root, table_path = _locate(path)
    table = _read_table(table_path, clinical_sheet)
    cols = _resolve_columns(table, columns, require_labels)
    phase_cols: list[int] = []
    mask_col = None
    if source == "manifest":
        phase_cols, mask_col = _manifest_columns(table)

    table_name = _display(table_path, root)
    rejected: list[Rejection] = []
    by_pid: dict[str, list[tuple[int, list[str]]]] = {}
    for line, cells in table.rows:
        pid = cells[cols.patient_id]
        if not pid:
            rejected.append(Rejection("", table_name, f"row {line}: empty patient_id"))
            continue
        by_pid.setdefault(pid, []).append((line, cells))

    cases = []
    for pid in sorted(by_pid):
        rows = by_pid[pid]
        if len(rows) > 1:
            lines = ", ".join(str(line) for line, _ in rows)
            centers = list(dict.fromkeys(c[cols.center] for _, c in rows))
            if len(centers) > 1:
                named = " and ".join(repr(c) for c in centers)
                reason = f"patient appears in {len(centers)} centres: {named} (rows {lines})"
            else:
                reason = f"duplicate patient_id (rows {lines})"
            rejected.append(Rejection(pid, table_name, reason))
            continue
        line, cells = rows[0]
        result = _read_row(pid, line, cells, cols, source, root, table_name,
                           phase_cols, mask_col, allow_outside_root)
        (cases if isinstance(result, Case) else rejected).append(result)

    unlisted = []
    if source == "mamamia" and (root / "images").is_dir():
        unlisted = sorted(e.name for e in os.scandir(root / "images")
                          if e.name not in by_pid and e.is_dir())
    rejected.sort(key=lambda r: (r.patient_id, r.file, r.reason))
    return Cohort(root=root, source=source, table=table_path, cases=cases, rejected=rejected,
                  unlisted=unlisted)


def _manifest_columns(table: _Table) -> tuple[list[int], int]:
    phases: dict[int, int] = {}
    for i, name in enumerate(table.header):
        m = _PHASE_COLUMN.match(name.lower())
        if m:
            phases[int(m.group(1))] = i
    mask = table.index("mask")
    missing = [n for n, ok in (("phase_0", 0 in phases), ("mask", mask is not None)) if not ok]
    if missing:
        raise Her2jaxError(f"missing required column(s): {', '.join(missing)} "
                           f"(columns found: {', '.join(table.header)})", file=str(table.path))
    gaps = [k for k in range(max(phases) + 1) if k not in phases]
    if gaps:
        raise Her2jaxError("phase columns must be phase_0, phase_1, ... without gaps; missing "
                           + ", ".join(f"phase_{k}" for k in gaps), file=str(table.path))
    return [phases[k] for k in range(len(phases))], mask


def _read_row(pid, line, cells, cols: _Columns, source, root, table_name, phase_cols,
              mask_col, allow_outside) -> Case | Rejection:
    bad = bad_patient_id(pid)
    if bad:
        return Rejection(pid, table_name, f"row {line}: {bad}")
    center = cells[cols.center]
    if not center:
        return Rejection(pid, table_name, f"row {line}: empty center")

    def cell(i):
        return "" if i is None else cells[i]

    try:
        ihc = labels.normalize_ihc(cell(cols.ihc), patient=pid)
        ish = labels.normalize_ish(cell(cols.ish), patient=pid)
        her2 = labels.normalize_her2(cell(cols.her2), patient=pid)
    except Her2jaxError as e:
        return Rejection(pid, table_name, f"row {line}: {e.reason}")
    derived, _ = labels.binary(ihc, ish, -1)
    if her2 in (0, 1) and derived is not None and derived != her2:
        return Rejection(pid, table_name, (
            f"row {line}: her2 {her2} contradicts IHC {ihc}" + (f" / ISH {ish}" if ish else "")
            + f" (HER2-{'positive' if derived else 'negative'} by ASCO/CAP)"))

    if source == "mamamia":
        phases, mask, file, reason = _mamamia_files(root, pid)
        if reason:
            return Rejection(pid, file, reason)
    else:
        values = [cells[i] for i in phase_cols]
        if not values[0]:
            return Rejection(pid, table_name, f"row {line}: phase_0 is empty")
        used = len(values)
        while not values[used - 1]:
            used -= 1
        gaps = [k for k in range(used) if not values[k]]
        if gaps:
            return Rejection(pid, table_name, f"row {line}: phase_{gaps[0]} is empty but a "
                             f"later phase is given")
        phases = []
        for k in range(used):
            p, file, reason = _manifest_path(values[k], root, allow_outside, "phase")
            if reason:
                return Rejection(pid, file, reason + f" (phase_{k})")
            phases.append(p)
        if not cells[mask_col]:
            return Rejection(pid, table_name, f"row {line}: mask is empty")
        mask, file, reason = _manifest_path(cells[mask_col], root, allow_outside, "mask")
        if reason:
            return Rejection(pid, file, reason)
    clinical = tuple((name, cells[i]) for name, i in cols.clinical)
    return Case(pid, center, tuple(phases), mask, ihc, ish, her2, clinical)


# ----------------------------------------------------------------------------- hashing

def cohort_listing_hash(cohort: Cohort) -> str:
    """sha256 hex of what the cohort's cases are made of.

    Covers, for every case in patient_id order: patient_id, center, ihc, ish, her2, the
    clinical values, and for each phase file and the mask its path (relative to the root when
    inside it), size and mtime_ns (following symlinks). Stable across reads of an unchanged
    cohort; changes when a file is touched or replaced or a table value changes.

    Raises:
      Her2jaxError: a case's file disappeared since the cohort was read.
    """
    digest = hashlib.sha256()
    for case in sorted(cohort.cases, key=lambda c: c.patient_id):
        files = []
        for f in (*case.phases, case.mask):
            try:
                st = os.stat(f)
            except OSError as e:
                raise Her2jaxError(f"file missing or unreadable since the cohort was read "
                                   f"({e.strerror or e})", patient=case.patient_id,
                                   file=str(f)) from e
            files.append([_display(f, cohort.root), st.st_size, st.st_mtime_ns])
        entry = [case.patient_id, case.center, case.ihc, case.ish, case.her2,
                 [list(kv) for kv in case.clinical], files]
        digest.update(json.dumps(entry, ensure_ascii=True).encode() + b"\n")
    return digest.hexdigest()

