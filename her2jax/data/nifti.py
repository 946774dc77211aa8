"""Safe NIfTI loading: every way a volume can be broken becomes one ``Her2jaxError``.

A cohort comes from outside, so every file is treated as untrusted. The header is read and
checked *before* any voxel is allocated: the format (gzip or plain, NIfTI-1 or -2 single file),
the dimensions, voxel sizes, affine, data type and whether the file can even hold the data it
declares. Voxel data are then read with nibabel, which reads exactly the bytes the header asks
for, so a gzip stream that inflates to far more than the header declares (a "gzip bomb") is
never inflated beyond that.

Limits (per volume):

* ``MAX_DIM``: each spatial dimension at most 4096 voxels.
* ``MAX_VOXELS``: at most 2**28 (268 M) voxels, i.e. 1 GiB as float32. Clinical breast
  DCE-MRI phases are about 512 x 512 x 200 (52 M voxels); anything past the limit is a broken
  or hostile header, not a scan.
* ``MAX_HEADER_BYTES``: header + extensions (the voxel offset) at most 16 MiB.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import zlib

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from her2jax.errors import Her2jaxError

MAX_DIM = 4096
MAX_VOXELS = 1024**3 // 4
MAX_HEADER_BYTES = 16 * 1024**2
# Deflate cannot compress better than 1032:1 (zlib FAQ): a .gz file of S bytes inflates to at
# most ~1032 * S bytes, so a tiny file declaring a huge image is truncated by construction.
_MAX_GZIP_RATIO = 1032
AFFINE_ATOL_MM = 1e-3

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
# What a broken or hostile file makes nibabel / gzip / zlib raise while reading.
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, ImageFileError, HeaderDataError)


def _fail(reason: str, patient: str | None, path) -> Her2jaxError:
    return Her2jaxError(reason, patient=patient, file=str(path))


def _is_gz(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_prefix(path: pathlib.Path, n: int, patient: str | None) -> bytes:
    """The first ``n`` bytes of the (decompressed) file; never inflates more than that."""
    try:
        if _is_gz(path):
            with gzip.open(path, "rb") as f:
                return f.read(n)
        with open(path, "rb") as f:
            return f.read(n)
    except _READ_ERRORS as e:
        raise _fail(f"unreadable or truncated NIfTI file ({type(e).__name__}: {e})",
                    patient, path) from e


def _header_class(prefix: bytes, patient, path):
    """Nifti1Header or Nifti2Header from the first bytes, or 'not a NIfTI file'."""
    for order in ("<", ">"):
        if len(prefix) >= 4:
            size = int(np.frombuffer(prefix[:4], dtype=f"{order}i4")[0])
            if size == 348 and len(prefix) >= 348:
                magic = prefix[344:348]
                if magic == b"n+1\x00":
                    return nib.Nifti1Header, nib.Nifti1Image
                if magic == b"ni1\x00":
                    raise _fail("is a NIfTI header of a .hdr/.img pair; expected a single-file "
                                ".nii or .nii.gz", patient, path)
            if size == 540 and prefix[4:12] == _NIFTI2_MAGIC:
                return nib.Nifti2Header, nib.Nifti2Image
    if len(prefix) < 348:
        raise _fail(f"not a NIfTI file (only {len(prefix)} bytes before end of file)",
                    patient, path)
    raise _fail(f"not a NIfTI file (starts with {prefix[:8]!r}, no NIfTI-1/-2 header)",
                patient, path)


def check_header(header, *, patient: str | None = None, file=None) -> tuple[int, ...]:
    """Checks a NIfTI header as stored (before nibabel's silent fixes) for a loadable 3D volume.

    Args:
      header: a ``Nifti1Header`` / ``Nifti2Header`` (read with ``check=False`` so that e.g. a
        zero voxel size is seen, not silently set to 1).
      patient, file: where, for the error message.

    Returns:
      The 3D shape (X, Y, Z); a 4th dimension of size 1 is allowed and dropped.

    Raises:
      Her2jaxError: dimensions absurd (< 1 or > MAX_DIM, more than MAX_VOXELS voxels), not 3D,
        unsupported voxel type, voxel sizes not finite and > 0, affine non-finite or singular.
    """
    dim = [int(d) for d in np.asarray(header["dim"])]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise _fail(f"header declares {ndim} dimensions (dim[0] must be 1..7)", patient, file)
    shape = tuple(dim[1:ndim + 1])
    if any(d < 1 or d > MAX_DIM for d in shape):
        raise _fail(f"header declares absurd dimensions {shape} (each must be 1..{MAX_DIM})",
                    patient, file)
    if ndim == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        hint = (f"; a 4D file with {shape[3]} volumes must be split into one 3D file per phase"
                if len(shape) == 4 else "")
        raise _fail(f"image is {len(shape)}D with shape {shape}; expected a 3D volume{hint}",
                    patient, file)
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_VOXELS:
        raise _fail(f"header declares {n} voxels {shape}, more than the limit of {MAX_VOXELS}",
                    patient, file)
    try:
        dtype = header.get_data_dtype()
    except (KeyError, HeaderDataError) as e:
        raise _fail(f"unknown NIfTI data type code {int(header['datatype'])}", patient,
                    file) from e
    if dtype.kind not in "biuf":
        raise _fail(f"unsupported voxel type {dtype} (expected integer or float)", patient, file)
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not (np.all(np.isfinite(zooms)) and np.all(zooms > 0)):
        raise _fail(f"voxel sizes {tuple(float(z) for z in zooms)} must be finite and > 0",
                    patient, file)
    with np.errstate(all="ignore"):
        try:
            affine = header.get_best_affine()
        except (HeaderDataError, ValueError) as e:
            raise _fail(f"invalid orientation in header ({e})", patient, file) from e
    if not np.all(np.isfinite(affine)):
        raise _fail("affine has NaN or Inf entries", patient, file)
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular.min() < 1e-6 or singular.min() < 1e-6 * singular.max():
        raise _fail(f"affine is singular (det {np.linalg.det(affine[:3, :3]):.3g}): the voxel "
                    "axes do not span 3D space", patient, file)
    return shape


def read_header_checked(path, *, patient: str | None = None):
    """Opens a NIfTI file lazily after checking it can be loaded safely.

    Nothing larger than the header (plus extensions, at most MAX_HEADER_BYTES) is read.

    Args:
      path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2, single file).
      patient: the patient id, for error messages.

    Returns:
      The nibabel image with its data still on disk (``img.dataobj`` is a proxy).

    Raises:
      Her2jaxError: missing file, not a NIfTI file, unreadable / truncated file, or a header
        that fails ``check_header``.
    """
    path = pathlib.Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise _fail("file missing", patient, path) from e
    except OSError as e:  # ELOOP, EACCES, ...
        raise _fail(f"cannot open file ({e.strerror or e})", patient, path) from e
    if not path.is_file():
        raise _fail("not a regular file", patient, path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise _fail("not a NIfTI file name (expected .nii or .nii.gz)", patient, path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if _is_gz(path) and not gzipped:
        with open(path, "rb") as f:
            head = f.read(352)
        try:
            _header_class(head, patient, path)
        except Her2jaxError:
            raise _fail(f"not a NIfTI file: named .gz but not gzip-compressed "
                        f"(starts with {head[:8]!r})", patient, path) from None
        raise _fail("named .nii.gz but is an uncompressed NIfTI file; rename it to .nii",
                    patient, path)
    if gzipped and not _is_gz(path):
        raise _fail("named .nii but is gzip-compressed; rename it to .nii.gz", patient, path)

    prefix = _read_prefix(path, 544, patient)
    header_klass, image_klass = _header_class(prefix, patient, path)
    try:
        raw = header_klass(prefix[:header_klass.template_dtype.itemsize], check=False)
    except _READ_ERRORS as e:
        raise _fail(f"invalid NIfTI header ({e})", patient, path) from e
    shape = check_header(raw, patient=patient, file=path)

    offset = int(raw["vox_offset"])
    header_end = header_klass.template_dtype.itemsize + 4
    if offset < header_end:
        # Also a safety check: with the offset inside the header, nibabel reads extensions
        # up to the end of the file, which on a .gz inflates the whole stream.
        raise _fail(f"header places the voxel data at byte {offset}, inside the header "
                    f"(a single-file NIfTI needs at least {header_end})", patient, path)
    if offset > MAX_HEADER_BYTES:
        raise _fail(f"header places the voxel data at byte {offset}, beyond the "
                    f"{MAX_HEADER_BYTES}-byte limit for header extensions", patient, path)
    # Parse the header with its extensions from a bounded in-memory copy first: nibabel reads
    # each extension's declared size without bounding it by the voxel offset, which on a
    # hostile .gz could inflate gigabytes. If the copy parses, the real read is identical.
    head = _read_prefix(path, offset, patient)
    try:
        header_klass.from_fileobj(io.BytesIO(head), check=True)
    except _READ_ERRORS as e:
        raise _fail(f"invalid NIfTI header or extensions ({e})", patient, path) from e

    data_end = offset + int(np.prod(shape, dtype=np.int64)) * raw.get_data_dtype().itemsize
    if not gzipped and st.st_size < data_end:
        raise _fail(f"truncated: the header declares {data_end} bytes (shape {shape}, "
                    f"{raw.get_data_dtype()}) but the file has {st.st_size}", patient, path)
    if gzipped and st.st_size * _MAX_GZIP_RATIO + 1024 < data_end:
        raise _fail(f"truncated: a {st.st_size}-byte gzip file cannot hold the {data_end} bytes "
                    f"the header declares (shape {shape}, {raw.get_data_dtype()})",
                    patient, path)
    try:
        return image_klass.from_filename(str(path), mmap=False)
    except _READ_ERRORS as e:
        raise _fail(f"unreadable NIfTI file ({type(e).__name__}: {e})", patient, path) from e


def _grid_mismatch(shape, affine, ref_shape, ref_affine) -> str:
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(shape)} != {tuple(ref_shape)}"
    if not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_ATOL_MM):
        diff = float(np.max(np.abs(affine - ref_affine)))
        return f"affine differs by up to {diff:.3g} mm (tolerance {AFFINE_ATOL_MM} mm)"
    return ""


def _format_labels(values) -> str:
    def fmt(v):
        v = float(v)
        return str(int(v)) if v.is_integer() else repr(v)
    shown = [fmt(v) for v in values[:10]]
    more = f", ... ({len(values)} values)" if len(values) > 10 else ""
    return "{" + ", ".join(shown) + more + "}"


def load_case(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads one case's phases and tumour mask, checking everything that can be wrong.

    All headers are checked (and the phases' grids compared) before any voxel is read.

    Args:
      case: a ``her2jax.data.cohort.Case`` (``patient_id``, ``phases``, ``mask``).

    Returns:
      phases: [P, X, Y, Z] float32, P = len(case.phases), in acquisition order.
      mask: [X, Y, Z] bool tumour mask on the same grid.
      affine: [4, 4] float64, phase 0's voxel-to-world (mm) affine.

    Raises:
      Her2jaxError: naming the patient and the file: any ``read_header_checked`` failure,
        phases or mask on a different grid than phase 0, unreadable / truncated voxel data,
        NaN / Inf voxels, an empty mask, or mask labels other than 0 / 1.
    """
    pid = case.patient_id
    if not case.phases:
        raise Her2jaxError("case has no phase files", patient=pid)
    images = [read_header_checked(p, patient=pid) for p in case.phases]
    ref_shape, ref_affine = images[0].shape[:3], images[0].affine
    for path, img in zip(case.phases[1:], images[1:], strict=True):
        bad = _grid_mismatch(img.shape[:3], img.affine, ref_shape, ref_affine)
        if bad:
            raise _fail(f"phase grid differs from phase 0 ({case.phases[0].name}): {bad}",
                        pid, path)
    mask_img = read_header_checked(case.mask, patient=pid)
    bad = _grid_mismatch(mask_img.shape[:3], mask_img.affine, ref_shape, ref_affine)
    if bad:
        raise _fail(f"mask grid does not match the image (phase 0): {bad}", pid, case.mask)

    phases = np.empty((len(images), *ref_shape), dtype=np.float32)
    for k, (path, img) in enumerate(zip(case.phases, images, strict=True)):
        data = _read_data(img, path, pid, dtype=np.float32)
        finite = np.isfinite(data)
        if not finite.all():
            raise _fail(f"{int(finite.size - np.count_nonzero(finite))} voxels are NaN or Inf "
                        "(as float32)", pid, path)
        phases[k] = data.reshape(ref_shape)
        del data, finite

    values = _read_data(mask_img, case.mask, pid, dtype=None).reshape(ref_shape)
    ones = values == 1
    other = (values != 0) & ~ones
    if other.any():
        found = np.unique(values[other])
        labels = ([0] if (values == 0).any() else []) + ([1] if ones.any() else [])
        labels = sorted([*labels, *found.tolist()], key=lambda v: (np.isnan(v), v))
        raise _fail(f"mask has labels {_format_labels(labels)}; expected 0/1", pid, case.mask)
    if not ones.any():
        raise _fail("mask is empty (no voxel is 1)", pid, case.mask)
    return phases, ones, np.asarray(ref_affine, dtype=np.float64)


def _read_data(img, path, patient, dtype) -> np.ndarray:
    """The voxel array (scaled; as ``dtype`` when given); read errors become Her2jaxError."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            if dtype is None:
                return np.asanyarray(img.dataobj)
            return np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as e:
        raise _fail(f"unreadable or truncated voxel data ({type(e).__name__}: "
                    f"{str(e).strip()})", patient, path) from e
