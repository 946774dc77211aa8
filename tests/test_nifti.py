"""Safe NIfTI loading: every broken or hostile file is one clear Her2jaxError, found early."""

from __future__ import annotations

import gzip
import pathlib
import shutil
import struct
import time
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from her2jax.data import nifti
from her2jax.data.cohort import Case
from her2jax.errors import Her2jaxError

SHAPE = (8, 8, 4)
NIBABEL_DATA = pathlib.Path(nib.__file__).parent / "tests" / "data"


def write_nifti(path, data, affine=None, *, header=None) -> pathlib.Path:
    """Writes ``data`` as NIfTI-1 (compressed when the name ends in .gz)."""
    path = pathlib.Path(path)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine, header)
    nib.save(img, path)
    return path


def make_mask(shape=SHAPE, dtype=np.uint8):
    mask = np.zeros(shape, dtype)
    mask[2:5, 2:5, 1:3] = 1
    return mask


def make_case(tmp_path, n_phases=3, shape=SHAPE, *, mask=None, affine=None, pid="P1",
              suffix=".nii.gz"):
    """Writes a valid case and returns (Case, phases array)."""
    rng = np.random.default_rng(0)
    phases = rng.normal(100, 10, (n_phases, *shape)).astype(np.float32)
    paths = tuple(write_nifti(tmp_path / f"{pid}_{k:04d}{suffix}", phases[k], affine)
                  for k in range(n_phases))
    mask_path = write_nifti(tmp_path / f"{pid}_mask{suffix}",
                            make_mask(shape) if mask is None else mask, affine)
    case = Case(patient_id=pid, center="A", phases=paths, mask=mask_path, ihc="", ish="",
                her2=-1, clinical=())
    return case, phases


def with_phase(case, k, path):
    phases = list(case.phases)
    phases[k] = path
    return Case(case.patient_id, case.center, tuple(phases), case.mask, "", "", -1, ())


def with_mask(case, path):
    return Case(case.patient_id, case.center, case.phases, path, "", "", -1, ())


def expect_error(fn, *parts, patient="P1", file=None):
    """Runs fn, asserting a one-line Her2jaxError naming the patient, the file and ``parts``."""
    with pytest.raises(Her2jaxError) as info:
        fn()
    err = info.value
    text = str(err)
    assert "\n" not in text
    if patient is not None:
        assert err.patient == patient and f"patient {patient}" in text
    if file is not None:
        assert err.file == str(file) and str(file) in text
    for part in parts:
        assert part in text, text
    return err


# ----------------------------------------------------------------------------- happy paths

def test_load_case_returns_float32_phases_bool_mask_and_affine(tmp_path):
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    affine[:3, 3] = [-100.0, 20.0, 5.0]
    case, expected = make_case(tmp_path, affine=affine)
    phases, mask, aff = nifti.load_case(case)
    assert phases.shape == (3, *SHAPE) and phases.dtype == np.float32
    np.testing.assert_array_equal(phases, expected)
    assert mask.dtype == bool and mask.shape == SHAPE
    np.testing.assert_array_equal(mask, make_mask().astype(bool))
    assert aff.dtype == np.float64
    np.testing.assert_allclose(aff, affine, atol=1e-5)


def test_uncompressed_4d_singleton_scaled_int_and_float_mask(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(data[..., None], np.eye(4), hdr)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "p0.nii")
    mask = write_nifti(tmp_path / "m.nii", make_mask(dtype=np.float32))
    case = Case("P1", "A", (tmp_path / "p0.nii",), mask, "", "", -1, ())
    phases, m, _ = nifti.load_case(case)
    assert phases.shape == (1, *SHAPE)
    np.testing.assert_allclose(phases[0], data * 0.5 + 10.0)
    assert m.sum() == make_mask().sum()


def test_nifti2_loads(tmp_path):
    case, expected = make_case(tmp_path, n_phases=1)
    nib.save(nib.Nifti2Image(expected[0], np.eye(4)), tmp_path / "n2.nii.gz")
    phases, _, _ = nifti.load_case(with_phase(case, 0, tmp_path / "n2.nii.gz"))
    np.testing.assert_array_equal(phases[0], expected[0])


def test_nibabel_shipped_3d_file_loads(tmp_path):
    src = NIBABEL_DATA / "anatomical.nii"
    img = nifti.read_header_checked(src, patient="ANAT")
    assert img.shape == (33, 41, 25)
    mask = np.zeros(img.shape, np.uint8)
    mask[10:20, 10:20, 10:15] = 1
    write_nifti(tmp_path / "mask.nii.gz", mask, img.affine)
    phases, m, affine = nifti.load_case(Case("ANAT", "A", (src,), tmp_path / "mask.nii.gz",
                                             "", "", -1, ()))
    assert phases.shape == (1, 33, 41, 25)
    np.testing.assert_array_equal(phases[0], np.asarray(img.dataobj, dtype=np.float32))
    assert m.sum() == 500
    np.testing.assert_allclose(affine, img.affine)


def test_nibabel_shipped_4d_file_is_rejected_from_its_header():
    src = NIBABEL_DATA / "example4d.nii.gz"
    expect_error(lambda: nifti.read_header_checked(src, patient="EX"), "4D",
                 "(128, 96, 24, 2)", "expected a 3D volume", "one 3D file per phase",
                 patient="EX", file=src)


# ----------------------------------------------------------------------------- not a NIfTI

def test_missing_file(tmp_path):
    case, _ = make_case(tmp_path)
    gone = tmp_path / "P1_0009.nii.gz"
    expect_error(lambda: nifti.load_case(with_phase(case, 1, gone)), "file missing", file=gone)


@pytest.mark.parametrize("name, content, message", [
    ("text.nii.gz", b"patient_id,center\nP1,A\n", "not gzip-compressed"),
    ("png.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(400), "not gzip-compressed"),
    ("text.nii", b"hello world, I am not an image\n" * 20, "not a NIfTI file"),
    ("short.nii", b"tiny", "not a NIfTI file"),
    ("empty.nii", b"", "not a NIfTI file"),
    ("gzipped_text.nii.gz", gzip.compress(b"just some text " * 100, mtime=0), "not a NIfTI file"),
    ("gzipped.nii", gzip.compress(b"x" * 1000, mtime=0), "rename it to .nii.gz"),
    ("scan.mgz", b"x" * 400, "expected .nii or .nii.gz"),
], ids=["text.nii.gz", "png.nii.gz", "text.nii", "short.nii", "empty.nii",
        "gzipped_text.nii.gz", "gzipped.nii", "scan.mgz"])
def test_not_a_nifti(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), message, file=path)


def test_uncompressed_nifti_named_gz_says_rename(tmp_path):
    write_nifti(tmp_path / "x.nii", np.zeros(SHAPE, np.float32))
    shutil.copy(tmp_path / "x.nii", tmp_path / "x.nii.gz")
    expect_error(lambda: nifti.read_header_checked(tmp_path / "x.nii.gz", patient="P1"),
                 "uncompressed", "rename it to .nii", file=tmp_path / "x.nii.gz")


def test_analyze_pair_header_is_refused(tmp_path):
    shutil.copy(NIBABEL_DATA / "nifti1.hdr", tmp_path / "pair.nii")
    expect_error(lambda: nifti.read_header_checked(tmp_path / "pair.nii", patient="P1"),
                 ".hdr/.img pair")


def test_directory_and_symlink_loop(tmp_path):
    (tmp_path / "dir.nii.gz").mkdir()
    expect_error(lambda: nifti.read_header_checked(tmp_path / "dir.nii.gz", patient="P1"),
                 "not a regular file")
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    expect_error(lambda: nifti.read_header_checked(tmp_path / "a.nii.gz", patient="P1"),
                 "cannot open file")


# ----------------------------------------------------------------------------- truncated

@pytest.mark.parametrize("keep", [0.95, 0.5, 0.1])
def test_truncated_gzip_is_rejected(tmp_path, keep):
    # Random data hardly compresses, so cutting the file cuts the voxel data.
    case, _ = make_case(tmp_path, shape=(32, 32, 16))
    path = case.phases[1]
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    expect_error(lambda: nifti.load_case(case), "truncated", file=path)


def test_gzip_cut_inside_the_header(tmp_path):
    case, _ = make_case(tmp_path)
    path = case.phases[0]
    with gzip.open(path) as f:
        head = f.read(200)
    path.write_bytes(gzip.compress(head)[:-8])   # no trailer, and only part of a header
    expect_error(lambda: nifti.load_case(case), file=path)


def test_truncated_uncompressed_is_rejected_before_reading(tmp_path):
    case, _ = make_case(tmp_path, suffix=".nii")
    path = case.phases[2]
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), "truncated",
                 "the header declares", file=path)


def test_corrupt_deflate_stream(tmp_path):
    case, _ = make_case(tmp_path, shape=(32, 32, 16))
    path = case.phases[0]
    data = bytearray(path.read_bytes())
    for i in range(400, len(data) - 16, 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    expect_error(lambda: nifti.load_case(case), file=path)


# ----------------------------------------------------------------------------- hostile files

def _header_bytes(shape, dtype=np.float32, **fields) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape if all(1 <= d <= 32767 for d in shape) else (1, 1, 1))
    if not all(1 <= d <= 32767 for d in shape):
        dims = [len(shape), *shape] + [1] * (7 - len(shape))
        hdr["dim"] = dims
    hdr["vox_offset"] = 352
    hdr.set_sform(np.eye(4), code=1)
    for key, value in fields.items():
        hdr[key] = value
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def _gzip_stream(chunks) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)   # 31: gzip container
    out = [comp.compress(c) for c in chunks]
    out.append(comp.flush())
    return b"".join(out)


def test_gzip_bomb_inflates_only_what_the_header_declares(tmp_path):
    voxels = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE, order="F")
    zeros = bytes(1 << 20)
    # 8x8x4 float32 (1 KiB) declared, then 128 MiB of zeros: a ~130 KB file.
    stream = _gzip_stream([_header_bytes(SHAPE), voxels.tobytes(order="F"),
                           *([zeros] * 128)])
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(stream)
    assert bomb.stat().st_size < 1 << 20
    case, _ = make_case(tmp_path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        phases, _, _ = nifti.load_case(with_phase(case, 1, bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 8 << 20, peak
    np.testing.assert_array_equal(phases[1], voxels)


def test_gzip_bomb_through_a_huge_header_extension_is_refused(tmp_path):
    # Extension flag set and one extension declaring ~2 GB: nibabel would read it whole.
    ext = struct.pack("<ii", 2_000_000_000, 0)
    # The voxel offset leaves room for one 16-byte extension, so nibabel reads it.
    head = _header_bytes(SHAPE, vox_offset=368)[:348] + b"\x01\x00\x00\x00" + ext
    stream = _gzip_stream([head, *([bytes(1 << 20)] * 64)])
    path = tmp_path / "ext.nii.gz"
    path.write_bytes(stream)
    tracemalloc.start()
    try:
        expect_error(lambda: nifti.read_header_checked(path, patient="P1"), "extensions",
                     file=path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_extension_read_to_end_of_stream_is_refused(tmp_path):
    # Offset 0 inside the header: nibabel then reads extensions "to the end of the file", and
    # an extension size of 7 asks for read(-1), inflating the whole stream.
    head = (_header_bytes(SHAPE, vox_offset=0)[:348] + b"\x01\x00\x00\x00"
            + struct.pack("<ii", 7, 0))
    path = tmp_path / "ext0.nii.gz"
    path.write_bytes(_gzip_stream([head, *([bytes(1 << 20)] * 64)]))
    tracemalloc.start()
    try:
        expect_error(lambda: nifti.read_header_checked(path, patient="P1"),
                     "inside the header", file=path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_voxel_offset_far_into_the_stream_is_refused(tmp_path):
    path = tmp_path / "offset.nii.gz"
    path.write_bytes(_gzip_stream([_header_bytes(SHAPE, vox_offset=1.0e9)]))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), "limit for header",
                 file=path)


@pytest.mark.parametrize("shape", [(4096, 4096, 16), (4000, 4000, 4000)])
def test_huge_declared_image_in_a_small_file_is_refused_without_allocating(tmp_path, shape):
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(_gzip_stream([_header_bytes(shape), bytes(4096)]))
    tracemalloc.start()
    try:
        expect_error(lambda: nifti.read_header_checked(path, patient="P1"), file=path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("shape, message", [
    ((5000, 8, 8), "absurd dimensions"),
    ((8, 0, 8), "absurd dimensions"),
    ((8, -3, 8), "absurd dimensions"),
    ((2048, 2048, 128), "more than the limit"),
    ((8, 8), "2D"),
    ((8, 8, 4, 2, 3), "5D"),
    ((8, 8, 4, 3), "4D"),
])
def test_absurd_or_wrong_dimensionality_headers(tmp_path, shape, message):
    path = tmp_path / "dims.nii.gz"
    path.write_bytes(_gzip_stream([_header_bytes(shape), bytes(4096)]))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), message, file=path)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4, 2, 3)])
def test_real_2d_and_5d_images_are_rejected(tmp_path, shape):
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros(shape, np.float32))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"),
                 f"{len(shape)}D", "expected a 3D volume", file=path)


@pytest.mark.parametrize("pixdim, message", [
    ([1, 0.0, 1, 1], "voxel sizes"),
    ([1, 1, np.nan, 1], "voxel sizes"),
    ([1, 1, 1, np.inf], "voxel sizes"),
    ([1, -0.5, 1, 1], "voxel sizes"),
])
def test_bad_voxel_sizes(tmp_path, pixdim, message):
    case, _ = make_case(tmp_path)
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4))
    nib.save(img, tmp_path / "z.nii")
    raw = bytearray((tmp_path / "z.nii").read_bytes())
    # pixdim starts at byte 76: patch it directly, as nibabel would "fix" it on save.
    raw[76:76 + 16] = np.asarray(pixdim, "<f4").tobytes()
    (tmp_path / "z.nii").write_bytes(bytes(raw))
    expect_error(lambda: nifti.load_case(with_phase(case, 0, tmp_path / "z.nii")), message,
                 file=tmp_path / "z.nii")


@pytest.mark.parametrize("affine, message", [
    (np.zeros((4, 4)), "singular"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], float), "singular"),
    (np.diag([1, 1, np.nan, 1.0]), "NaN or Inf"),
])
def test_bad_affines(tmp_path, affine, message):
    path = tmp_path / "aff.nii.gz"
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4))
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    # nibabel rebuilds the header from the image affine on save: write the header bytes.
    hdr = img.header
    path.write_bytes(_gzip_stream([hdr.binaryblock + bytes(4),
                                   np.ones(SHAPE, np.float32).tobytes(order="F")]))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), message, file=path)


@pytest.mark.parametrize("dtype, message", [(np.complex64, "unsupported voxel type")])
def test_unsupported_voxel_type(tmp_path, dtype, message):
    path = write_nifti(tmp_path / "c.nii.gz", np.ones(SHAPE, dtype))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), message, file=path)


def test_unknown_datatype_code(tmp_path):
    path = tmp_path / "code.nii.gz"
    head = bytearray(_header_bytes(SHAPE))
    head[70:72] = struct.pack("<h", 999)   # datatype
    path.write_bytes(_gzip_stream([bytes(head), bytes(1024)]))
    expect_error(lambda: nifti.read_header_checked(path, patient="P1"), "data type",
                 file=path)


# ----------------------------------------------------------------------------- voxel content

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_name_the_phase(tmp_path, bad):
    case, phases = make_case(tmp_path)
    data = phases[2].copy()
    data[1, 2, 3] = bad
    write_nifti(case.phases[2], data)
    expect_error(lambda: nifti.load_case(case), "1 voxels are NaN or Inf", file=case.phases[2])


def test_float64_overflowing_float32_is_non_finite(tmp_path):
    case, _ = make_case(tmp_path)
    data = np.full(SHAPE, 1e300)
    write_nifti(case.phases[0], data)
    expect_error(lambda: nifti.load_case(case), "NaN or Inf", file=case.phases[0])


def test_phase_with_another_shape_names_that_phase(tmp_path):
    case, _ = make_case(tmp_path)
    write_nifti(case.phases[1], np.ones((8, 8, 5), np.float32))
    expect_error(lambda: nifti.load_case(case), "phase grid differs", "(8, 8, 5)",
                 file=case.phases[1])


def test_phase_affine_tolerance(tmp_path):
    case, _ = make_case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 1e-4          # within 1e-3 mm: same grid
    write_nifti(case.phases[2], np.ones(SHAPE, np.float32), shifted)
    nifti.load_case(case)
    shifted[0, 3] = 0.05           # half a tenth of a millimetre: another grid
    write_nifti(case.phases[2], np.ones(SHAPE, np.float32), shifted)
    expect_error(lambda: nifti.load_case(case), "affine differs", file=case.phases[2])


def test_mask_grid_mismatch(tmp_path):
    case, _ = make_case(tmp_path)
    write_nifti(case.mask, make_mask((8, 8, 5)))
    expect_error(lambda: nifti.load_case(case), "mask grid", file=case.mask)
    write_nifti(case.mask, make_mask(), np.diag([2.0, 1, 1, 1]))
    expect_error(lambda: nifti.load_case(case), "mask grid", "affine", file=case.mask)


def test_empty_mask(tmp_path):
    case, _ = make_case(tmp_path, mask=np.zeros(SHAPE, np.uint8))
    expect_error(lambda: nifti.load_case(case), "mask is empty", file=case.mask)


def test_mask_with_other_labels_names_them(tmp_path):
    mask = make_mask()
    mask[0, 0, 0] = 2
    case, _ = make_case(tmp_path, mask=mask)
    expect_error(lambda: nifti.load_case(case), "mask has labels {0, 1, 2}; expected 0/1",
                 file=case.mask)
    fractional = make_mask(dtype=np.float32)
    fractional[0, 0, 0] = 0.5
    write_nifti(case.mask, fractional)
    expect_error(lambda: nifti.load_case(case), "{0, 0.5, 1}", file=case.mask)


# ----------------------------------------------------------------------------- property

def _expected_ok(ndim, dims):
    if not 1 <= ndim <= 7:
        return False
    shape = dims[:ndim]
    if any(d < 1 or d > nifti.MAX_DIM for d in shape):
        return False
    if ndim == 4 and shape[3] == 1:
        shape = shape[:3]
    return len(shape) == 3 and int(np.prod(shape, dtype=np.int64)) <= nifti.MAX_VOXELS


DIM = st.one_of(st.integers(1, 16), st.integers(-3, 0), st.integers(4000, 4200),
                st.integers(1, 4096))


@settings(max_examples=300, deadline=None)
@given(st.integers(-1, 8), st.lists(DIM, min_size=7, max_size=7))
def test_header_dimension_rules(ndim, dims):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr["dim"] = [ndim, *dims]
    ok = _expected_ok(ndim, dims)
    if ok:
        shape = nifti.check_header(hdr, patient="P1", file="x.nii.gz")
        assert shape == tuple(dims[:3])
    else:
        with pytest.raises(Her2jaxError) as info:
            nifti.check_header(hdr, patient="P1", file="x.nii.gz")
        assert "x.nii.gz" in str(info.value)
