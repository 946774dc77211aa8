"""Preprocessing on real NIfTI files and on phantoms of known world geometry."""

from __future__ import annotations

import itertools
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from her2jax.data import preprocess as pp
from her2jax.data import recipes
from her2jax.errors import Her2jaxError

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")

# One world object: a tumour ellipsoid elongated along A, then S, then R, in a
# background with gradients; inside, brighter anteriorly, so that a flip shows.
CENTRE = np.array([3.0, -5.0, 10.0])
RADII = np.array([6.0, 11.0, 8.0])
# A 1 mm RAS lattice holding it, (origin, shape).
RAS_ORIGIN = np.array([-24.0, -30.0, -10.0])
RAS_SHAPE = (48, 56, 40)


def recipe(**overrides):
    r = recipes.recipe_config("fmbcmri")
    for key, value in overrides.items():
        r[key] = value
    return r


def phantom(affine, shape, enhancement=(0.0,), asymmetric_mask=False):
    """Phases [P, X, Y, Z] float32 and mask [X, Y, Z] sampled at each voxel's world position.

    ``asymmetric_mask`` cuts the left-posterior-inferior corner out of the mask, so that a flip
    of the mask inside its bounding box shows."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:]
    rel = (world - CENTRE[:, None]) / RADII[:, None]
    r = np.sqrt((rel ** 2).sum(0))
    tumour = 1 / (1 + np.exp((r - 1) / 0.2)) * (1 + 0.4 * rel[1])
    background = 100 + 0.8 * world[0] + 0.5 * world[1] - 0.3 * world[2]
    phases = np.stack([background + 300 * (1 + e) * tumour for e in enhancement])
    mask = r <= 1
    if asymmetric_mask:
        mask &= ~((rel[0] < -0.2) & (rel[1] < -0.2) & (rel[2] < 0.2))
    return phases.reshape((-1, *shape)).astype(np.float32), mask.reshape(shape)


def signed_permutation_affine(perm, signs, zooms=(1.0, 1.0, 1.0), origin=RAS_ORIGIN,
                              ras_shape=RAS_SHAPE):
    """Affine and shape of the lattice `origin + diag(zooms) @ index` stored with source axis i
    along world axis perm[i], reversed where signs[i] < 0 (same voxel centres as RAS)."""
    affine = np.eye(4)
    corner = np.zeros(3)
    for i, (k, s) in enumerate(zip(perm, signs, strict=True)):
        affine[:3, i] = 0
        affine[k, i] = s * zooms[k]
        if s < 0:
            corner[k] = ras_shape[k] - 1
    affine[:3, 3] = origin + corner * np.asarray(zooms)
    return affine, tuple(ras_shape[k] for k in perm)


def mask_centroid_world(crop):
    centroid = np.argwhere(crop.mask > 0).mean(0)
    return (crop.crop_affine @ np.append(centroid, 1))[:3], centroid


def corr(a, b):
    return np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1]


# Source orientations of one world object: RAS, LPS, permuted axes (sagittal-like S,P,R
# storage), and anisotropic 0.75 x 0.75 x 2.5 mm voxels.
ORIENTATIONS = {
    "RAS": signed_permutation_affine((0, 1, 2), (1, 1, 1)),
    "LPS": signed_permutation_affine((0, 1, 2), (-1, -1, 1)),
    "SPR": signed_permutation_affine((2, 1, 0), (1, -1, 1)),
    "LAS_aniso": signed_permutation_affine((0, 1, 2), (-1, 1, 1), zooms=(0.75, 0.75, 2.5),
                                           ras_shape=(64, 75, 16)),
}


@pytest.fixture(scope="module")
def sources():
    return {name: (*phantom(aff, shape), aff) for name, (aff, shape) in ORIENTATIONS.items()}


# ----------------------------------------------------------------------------- real NIfTI files


@pytest.mark.parametrize("filename", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"])
def test_nibabel_files_crop_maps_back_onto_the_source(filename):
    img = nib.load(os.path.join(NIB_DATA, filename))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data[..., 0] if data.ndim == 4 else data
    assert nib.aff2axcodes(img.affine) != ("R", "A", "S")  # these files are LAS, some oblique
    centre = np.array(data.shape) // 2
    mask = np.linalg.norm(np.indices(data.shape) - centre[:, None, None, None], axis=0) <= 3.5

    crop = pp.preprocess(data[None], mask, img.affine, recipe(channels=("C0",), normalize="none",
                                                               shape=(20, 24, 16)))

    assert nib.aff2axcodes(crop.crop_affine) == ("R", "A", "S")
    canonical = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    # crop axes are the canonical image's axes: same column directions
    cols = crop.crop_affine[:3, :3] / np.linalg.norm(crop.crop_affine[:3, :3], axis=0)
    canon_cols = canonical.affine[:3, :3] / np.linalg.norm(canonical.affine[:3, :3], axis=0)
    np.testing.assert_allclose(cols, canon_cols, atol=1e-6)
    # Every output voxel holds the source image's trilinear value at that voxel's world position.
    src_index = (np.linalg.inv(img.affine) @ crop.crop_affine
                 @ np.vstack([np.indices(crop.mask.shape).reshape(3, -1),
                              np.ones((1, crop.mask.size))]))[:3]
    expected = ndimage.map_coordinates(data, src_index, order=1, mode="grid-constant")
    got = crop.image[..., 0].astype(np.float32).ravel()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * np.abs(data).max())
    # The tumour keeps its world position.
    world_src = (img.affine @ np.append(np.argwhere(mask).mean(0), 1))[:3]
    world_crop, _ = mask_centroid_world(crop)
    assert np.linalg.norm(world_crop - world_src) < 0.5 * min(img.header.get_zooms()[:3])
    # box: the source voxels read cover the tumour, inside the image
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0) + 1
    assert np.all(crop.box[:, 0] <= lo) and np.all(crop.box[:, 1] >= hi)
    assert np.all(crop.box[:, 0] >= 0) and np.all(crop.box[:, 1] <= data.shape)
    np.testing.assert_array_equal(crop.source_shape, data.shape)
    np.testing.assert_array_equal(crop.source_affine, img.affine)


def test_saved_and_reloaded_nifti_gives_the_same_crop(tmp_path, sources):
    phases, mask, affine = sources["LPS"]
    nib.save(nib.Nifti1Image(phases[0].astype(np.int16), affine), tmp_path / "c0.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    img, seg = nib.load(tmp_path / "c0.nii.gz"), nib.load(tmp_path / "seg.nii.gz")
    r = recipe(channels=("C0",), normalize="none")

    loaded = pp.preprocess([img.get_fdata(dtype=np.float32)], np.asanyarray(seg.dataobj),
                           img.affine, r)
    direct = pp.preprocess(phases[:1].astype(np.int16).astype(np.float32), mask, affine, r)

    np.testing.assert_array_equal(loaded.image, direct.image)
    np.testing.assert_array_equal(loaded.mask, direct.mask)
    np.testing.assert_allclose(loaded.crop_affine, direct.crop_affine, atol=1e-4)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("spacing_mm", [0.0, 1.0])
@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_tumour_is_centred_and_keeps_its_world_position(sources, name, spacing_mm):
    phases, mask, affine = sources[name]
    crop = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), shape=(32, 32, 32),
                                                      spacing_mm=spacing_mm))
    world, centroid = mask_centroid_world(crop)
    voxel = np.linalg.norm(affine[:3, :3], axis=0).max()

    assert crop.mask.sum() > 0.2 * crop.mask.size if spacing_mm == 0 else crop.mask.sum() > 500
    np.testing.assert_allclose(centroid, 15.5, atol=1.0)  # centred in the 32-voxel grid
    assert np.linalg.norm(world - CENTRE) < voxel
    assert nib.aff2axcodes(crop.crop_affine) == ("R", "A", "S")


def test_same_world_object_gives_the_same_crop_whatever_the_orientation(sources):
    r = recipe(channels=("C0",), shape=(32, 32, 32), spacing_mm=1.0)
    reference = pp.preprocess(*sources["RAS"], r)
    for name in ORIENTATIONS:
        crop = pp.preprocess(*sources[name], r)
        assert corr(crop.image, reference.image) > 0.95, name
        np.testing.assert_allclose(crop.crop_affine, reference.crop_affine, atol=1.0)


def test_all_48_axis_orientations_give_identical_crops():
    r = recipe(channels=("C0",), shape=(16, 20, 12), margin_mm=2.0)
    shape = (30, 34, 28)
    origin = CENTRE - np.array([14.0, 17.0, 13.0])
    reference = None
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            affine, src_shape = signed_permutation_affine(perm, signs, origin=origin,
                                                          ras_shape=shape)
            crop = pp.preprocess(*phantom(affine, src_shape, asymmetric_mask=True), affine, r)
            if reference is None:
                reference = crop
                continue
            np.testing.assert_allclose(crop.image.astype(np.float32),
                                       reference.image.astype(np.float32), atol=2e-3)
            np.testing.assert_array_equal(crop.mask, reference.mask)
            np.testing.assert_allclose(crop.crop_affine, reference.crop_affine, atol=1e-9)
    assert reference.image.std() > 0.5  # not trivially equal
    assert not np.array_equal(reference.mask, reference.mask[::-1])  # a flip would show


def test_crop_axes_are_anatomical_ras(sources):
    # The tumour is longest along A (11 mm radius), then S (8), then R (6).
    phases, mask, affine = sources["SPR"]  # stored S, P, R
    iso = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), shape=(32, 32, 32),
                                                     spacing_mm=1.0))
    extent = [np.ptp(np.nonzero(iso.mask)[axis]) + 1 for axis in range(3)]
    assert extent[1] > extent[2] > extent[0]
    np.testing.assert_allclose(extent, 2 * RADII, atol=2)
    # Box resized to a cube: the elongation moves into the voxel sizes.
    box = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), shape=(32, 32, 32)))
    mm_per_voxel = np.linalg.norm(box.crop_affine[:3, :3], axis=0)
    assert mm_per_voxel[1] > mm_per_voxel[2] > mm_per_voxel[0]
    # Brighter anteriorly inside the tumour: intensity rises along output axis 1.
    profile = iso.image[16, :, 16, 0].astype(np.float32)
    assert profile[22] > profile[16] > profile[10]


def test_largest_component_ignores_a_second_small_blob(sources):
    phases, mask, affine = sources["RAS"]
    two = mask.copy()
    two[2:5, 2:5, 2:5] = True  # a small blob far from the tumour
    kept = pp.preprocess(phases, two, affine, recipe(channels=("C0",)))
    alone = pp.preprocess(phases, mask, affine, recipe(channels=("C0",)))
    both = pp.preprocess(phases, two, affine, recipe(channels=("C0",), largest_component=False))

    np.testing.assert_array_equal(kept.box, alone.box)
    np.testing.assert_array_equal(kept.image, alone.image)
    assert np.all(both.box[:, 0] <= 2)  # without it, the box stretches to the blob
    assert both.mask.sum() > 0 and (both.box[:, 1] - both.box[:, 0]).prod() > 2 * (
        kept.box[:, 1] - kept.box[:, 0]).prod()


def test_margin_adds_its_millimetres_on_every_side(sources):
    phases, mask, affine = sources["LAS_aniso"]
    tight = pp.preprocess(phases, mask, affine, recipe(channels=("C0",)))
    wide = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), margin_mm=5.0))
    n = np.array(recipe().shape)
    extent = lambda c: np.linalg.norm(c.crop_affine[:3, :3], axis=0) * n  # noqa: E731

    np.testing.assert_allclose(extent(wide) - extent(tight), 10.0, atol=1e-6)
    # same centre, and the tumour shrinks inside the bigger box
    centre = lambda c: (c.crop_affine @ np.append((n - 1) / 2, 1))[:3]  # noqa: E731
    np.testing.assert_allclose(centre(wide), centre(tight), atol=1e-6)
    assert wide.mask.sum() < 0.8 * tight.mask.sum()
    # the tight box spans the mask's voxels exactly (edge to edge)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    tumour_voxels = np.ptp(np.nonzero(mask), axis=1) + 1
    np.testing.assert_allclose(extent(tight), tumour_voxels * zooms, atol=1e-6)


@pytest.mark.parametrize("name", ["LAS_aniso", "SPR"])
def test_box_edges_map_onto_output_edges(sources, name):
    # Centre-aligned resize: the tight box's outer voxel edges are the output's outer edges.
    phases, mask, affine = sources[name]
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    vox = np.argwhere(mask)
    edges = (affine[:3, :3] @ (vox[:, None, :] + corners[None]).reshape(-1, 3).T).T + affine[:3, 3]
    lo_mm, hi_mm = edges.min(0), edges.max(0)
    n = np.array([20, 24, 16])
    crop = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), shape=tuple(n)))
    first = (crop.crop_affine @ np.array([-0.5, -0.5, -0.5, 1]))[:3]
    last = (crop.crop_affine @ np.append(n - 0.5, 1))[:3]
    np.testing.assert_allclose(first, lo_mm, atol=1e-6)  # RAS: index up = world up
    np.testing.assert_allclose(last, hi_mm, atol=1e-6)
    # spacing_mm > 0: the grid is centred on the tight box's centre
    iso = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), shape=tuple(n),
                                                     spacing_mm=1.5))
    centre = (iso.crop_affine @ np.append((n - 1) / 2, 1))[:3]
    np.testing.assert_allclose(centre, (lo_mm + hi_mm) / 2, atol=1e-6)


@pytest.mark.parametrize("spacing_mm", [0.5, 1.0, 2.0])
def test_spacing_path_keeps_physical_scale(sources, spacing_mm):
    phases, _, affine = sources["LAS_aniso"]
    # a 20 mm sphere at the known centre
    idx = np.indices(phases.shape[1:]).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:]
    sphere = (np.linalg.norm(world - CENTRE[:, None], axis=0) <= 10).reshape(phases.shape[1:])
    shape = (24, 28, 20)
    crop = pp.preprocess(phases, sphere, affine, recipe(channels=("C0",), shape=shape,
                                                        spacing_mm=spacing_mm))

    np.testing.assert_allclose(np.linalg.norm(crop.crop_affine[:3, :3], axis=0), spacing_mm)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    # Output voxels across = the voxelised sphere's extent in mm (~20 mm; 17.5 mm along the
    # 2.5 mm slices) / spacing; nearest sampling moves each edge by <= half a voxel of each grid.
    across = np.array([np.ptp(np.nonzero(crop.mask)[a]) + 1 for a in range(3)])
    sphere_mm = (np.ptp(np.nonzero(sphere), axis=1) + 1) * zooms
    assert np.all(np.abs(sphere_mm - 20) <= zooms)
    expected = np.minimum(sphere_mm / spacing_mm, shape)
    assert np.all(np.abs(across - expected) <= 1 + zooms / spacing_mm), across
    # The source region read is the stated physical box plus at most the interpolation stencil.
    box_mm = (crop.box[:, 1] - crop.box[:, 0]) * zooms
    inside = (crop.box[:, 0] > 0) & (crop.box[:, 1] < phases.shape[1:])
    stated = np.array(shape) * spacing_mm
    assert np.all(box_mm[inside] >= stated[inside] - zooms[inside])
    assert np.all(box_mm[inside] <= stated[inside] + 2 * zooms[inside])


def test_grid_outside_the_image_reads_zero_and_keeps_the_tumour_centred():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (40, 40, 20)
    phases = np.full((1, *shape), 50.0, np.float32)
    mask = np.zeros(shape, bool)
    mask[1:6, 18:24, 8:12] = True  # near the x = 0 edge
    crop = pp.preprocess(phases, mask, affine, recipe(normalize="none", channels=("C0",),
                                                      margin_mm=6.0, shape=(22, 16, 16)))
    assert crop.box[0, 0] == 0  # clipped to the image
    world = crop.crop_affine @ np.vstack([np.indices(crop.mask.shape).reshape(3, -1),
                                          np.ones((1, crop.mask.size))])
    x = world[0].reshape(crop.mask.shape)
    image = crop.image[..., 0].astype(np.float32)
    assert np.all(image[x < -1] == 0)        # beyond one voxel outside: zero
    assert np.all(image[x >= 0] == 50)       # inside: the image
    assert np.any(image[(x > -1) & (x < 0)] > 0)  # in between: linear towards zero
    np.testing.assert_allclose(np.argwhere(crop.mask).mean(0), (np.array([22, 16, 16]) - 1) / 2,
                               atol=1.0)


# ----------------------------------------------------------------------------- channels


def constant_case(values, shape=(20, 20, 10)):
    phases = np.stack([np.full(shape, v, np.float32) for v in values])
    mask = np.zeros(shape, bool)
    mask[6:14, 5:15, 3:7] = True
    return phases, mask, np.diag([0.8, 0.8, 2.0, 1.0])


def test_channel_values_on_constant_phases():
    phases, mask, affine = constant_case([100, 250, 300, 280])
    crop = pp.preprocess(phases, mask, affine, recipe(
        channels=("C0", "C2", "SUB1", "SUB3", "PE", "SER"), normalize="none"))
    got = crop.image.astype(np.float32)
    expected = [100, 300, 150, 180, 1.5, 150 / 180]  # SER uses the LAST phase, C3
    for c, value in enumerate(expected):
        np.testing.assert_allclose(got[..., c], value, rtol=1e-3)


def test_enhancement_at_any_phase_and_the_mask_channel():
    phases, mask, affine = constant_case([100, 250, 300, 280])
    crop = pp.preprocess(phases, mask, affine, recipe(
        channels=("PE", "PE1", "PE2", "PEL", "MASK"), normalize="none", spacing_mm=1.0,
        shape=(16, 16, 16)))
    got = crop.image.astype(np.float32)
    for c, value in enumerate([1.5, 1.5, 2.0, 1.8]):   # PEL: the last phase, C3
        np.testing.assert_allclose(got[..., c], value, rtol=1e-3)
    # MASK is the kept component on the output grid: 1 inside, 0 outside, partial at the edge.
    inner = ndimage.binary_erosion(crop.mask > 0)
    assert inner.any() and np.all(got[..., 4][inner] == 1.0)
    assert np.all(got[..., 4][crop.mask > 0] >= 0.5)
    # Linear interpolation reaches one source voxel (up to 2 mm here) past the edge.
    assert np.all(got[..., 4][~ndimage.binary_dilation(crop.mask > 0, iterations=2)] == 0.0)
    assert pp.required_phases(recipe(channels=("PEL", "MASK"))) == 2
    assert pp.required_phases(recipe(channels=("PE3",))) == 4
    for bad in ("PE0", "PEX", "MASK1"):
        with pytest.raises(Her2jaxError, match="recipe.channels"):
            pp.check_recipe(recipe(channels=(bad,)))
    with pytest.raises(Her2jaxError, match="needs phase 5"):
        pp.check_recipe(recipe(channels=("PE5",)), num_phases=4)


def test_ratio_normalisation_keeps_dimensionless_channels_and_zscores_intensities(sources):
    affine = ORIENTATIONS["RAS"][0]
    phases, mask = phantom(affine, RAS_SHAPE, enhancement=(0.0, 1.0, 1.3))
    channels = ("C2", "SUB1", "PE", "PEL", "SER", "MASK")
    raw = pp.preprocess(phases, mask, affine, recipe(channels=channels, normalize="none"))
    ratio = pp.preprocess(phases, mask, affine, recipe(channels=channels, normalize="ratio"))
    crop = pp.preprocess(phases, mask, affine, recipe(channels=channels, normalize="crop"))
    # Intensities: z-scored over the crop, like 'crop'.
    np.testing.assert_array_equal(ratio.image[..., :2], crop.image[..., :2])
    # Ratios and the mask: untouched (and the mask is never z-scored, even by 'crop').
    np.testing.assert_array_equal(ratio.image[..., 2:], raw.image[..., 2:])
    np.testing.assert_array_equal(crop.image[..., 5], raw.image[..., 5])
    assert pp.recipe_fingerprint(recipe(normalize="ratio")) != pp.recipe_fingerprint(
        recipe(normalize="crop"))


def test_pe_and_ser_are_bounded_where_denominators_vanish():
    shape = (20, 20, 10)
    c0 = np.full(shape, 100, np.float32)
    c0[:10] = 0                    # "air" half: no pre-contrast signal
    c1 = c0 + 200                  # strong wash-in everywhere
    c2 = c0.copy()                 # no late enhancement: SER's denominator is 0
    mask = np.zeros(shape, bool)
    mask[5:15, 5:15, 3:7] = True
    crop = pp.preprocess(np.stack([c0, c1, c2]), mask, np.eye(4),
                         recipe(channels=("PE", "SER"), normalize="none", shape=(20, 20, 8)))
    pe, ser = crop.image[..., 0].astype(np.float32), crop.image[..., 1].astype(np.float32)
    assert np.isfinite(crop.image).all()
    assert pe.max() == pp.PE_RANGE[1] and pe.min() >= pp.PE_RANGE[0]
    np.testing.assert_allclose(pe[-1], 2.0, rtol=1e-3)  # tissue side: exact (200 / 100)
    assert ser.max() == pp.SER_RANGE[1] and ser.min() >= pp.SER_RANGE[0]


def test_crop_normalisation_is_a_zscore_per_channel(sources):
    affine = ORIENTATIONS["RAS"][0]
    phases, mask = phantom(affine, RAS_SHAPE, enhancement=(0.0, 1.0, 1.3))
    crop = pp.preprocess(phases, mask, affine, recipe(channels=("C0", "C2", "SUB2", "PE", "SER"),
                                                      normalize="crop"))
    x = crop.image.astype(np.float64).reshape(-1, 5)
    np.testing.assert_allclose(x.mean(0), 0, atol=2e-3)
    np.testing.assert_allclose(x.std(0), 1, atol=2e-3)


def test_joint_normalisation_uses_whole_image_stats_for_intensities(sources):
    affine = ORIENTATIONS["RAS"][0]
    phases, mask = phantom(affine, RAS_SHAPE, enhancement=(0.0, 1.0, 1.3, 0.9))
    channels = ("C0", "C2", "SUB2")
    raw = pp.preprocess(phases, mask, affine, recipe(channels=channels, normalize="none"))
    joint = pp.preprocess(phases, mask, affine, recipe(channels=channels, normalize="joint"))
    mean, std = phases.astype(np.float64).mean(), phases.astype(np.float64).std(ddof=1)

    expected = (raw.image[..., :2].astype(np.float64) - mean) / std
    np.testing.assert_allclose(joint.image[..., :2].astype(np.float64), expected, atol=2e-2)
    crop_mean = joint.image[..., :2].astype(np.float64).mean()
    assert crop_mean > 0.5  # the tumour crop is brighter than the whole image: not per-crop
    sub = joint.image[..., 2].astype(np.float64)  # derived channel: per crop
    assert abs(sub.mean()) < 2e-3 and abs(sub.std() - 1) < 2e-3


def test_output_dtype_shape_and_mask_only(sources):
    affine, shape = ORIENTATIONS["LPS"]
    phases, mask = phantom(affine, shape, enhancement=(0.0, 1.0, 1.3))
    r = recipe(channels=("C1", "SUB2", "SER"), shape=(40, 32, 24), margin_mm=4.0,
               mask_only=True)
    crop = pp.preprocess(phases, mask, affine, r)

    assert crop.image.shape == (40, 32, 24, 3) and crop.image.dtype == np.float16
    assert crop.mask.shape == (40, 32, 24) and crop.mask.dtype == np.uint8
    assert crop.box.shape == (3, 2) and crop.box.dtype == np.int32
    assert crop.crop_affine.shape == (4, 4) and crop.crop_affine.dtype == np.float64
    assert np.isfinite(crop.image).all()
    outside = crop.mask == 0
    assert outside.any() and np.all(crop.image[outside] == 0)
    assert np.all(np.abs(crop.image[~outside]).sum(-1) > 0)


def test_non_finite_source_voxels_read_as_zero():
    phases, mask, affine = constant_case([100.0, 200.0])
    phases[1, 7, 7, 4] = np.nan
    crop = pp.preprocess(phases, mask, affine, recipe(channels=("C1",), normalize="joint"))
    assert np.isfinite(crop.image).all()
    assert crop.image.astype(np.float32).std() > 0  # the NaN voxel became a (zero) dip


def test_raw_intensities_beyond_float16_are_clipped_not_inf():
    phases, mask, affine = constant_case([1e6])
    crop = pp.preprocess(phases, mask, affine, recipe(channels=("C0",), normalize="none"))
    assert np.isfinite(crop.image).all() and crop.image.max() == np.finfo(np.float16).max


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override, num_phases, key", [
    (dict(channels=("C2x",)), None, "recipe.channels"),
    (dict(channels=("SUB0",)), None, "recipe.channels"),
    (dict(channels=("C3",)), 3, "recipe.channels"),
    (dict(channels=("SUB2",)), 2, "recipe.channels"),
    (dict(channels=("SER",)), 2, "recipe.channels"),
    (dict(channels=("PE",)), 1, "recipe.channels"),
    (dict(channels=()), None, "recipe.channels"),
    (dict(shape=(48, 48)), None, "recipe.shape"),
    (dict(shape=(48, 0, 48)), None, "recipe.shape"),
    (dict(shape=(48, 48.5, 48)), None, "recipe.shape"),
    (dict(margin_mm=-1.0), None, "recipe.margin_mm"),
    (dict(spacing_mm=-0.5), None, "recipe.spacing_mm"),
    (dict(spacing_mm=float("nan")), None, "recipe.spacing_mm"),
    (dict(normalize="zscore"), None, "recipe.normalize"),
    (dict(mask_only="yes"), None, "recipe.mask_only"),
])
def test_check_recipe_names_the_key(override, num_phases, key):
    r = recipes.recipe_config("fmbcmri").to_dict()
    r.update(override)
    with pytest.raises(Her2jaxError) as err:
        pp.check_recipe(r, num_phases)
    assert err.value.key == key and key in str(err.value)


def test_check_recipe_reports_a_missing_field():
    r = recipes.recipe_config("fmbcmri").to_dict()
    del r["normalize"]
    with pytest.raises(Her2jaxError, match="recipe.normalize"):
        pp.check_recipe(r)


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_named_recipes_pass_with_exactly_their_phases(name):
    r = recipes.recipe_config(name)
    need = pp.required_phases(r)
    pp.check_recipe(r, need)
    with pytest.raises(Her2jaxError, match="channels"):
        pp.check_recipe(r, need - 1)


@pytest.mark.parametrize("channels, need", [
    (("C2",), 3), (("C0",), 1), (("SER",), 3), (("PE",), 2), (("SUB1",), 2),
    (("C1", "SUB4"), 5), (("c1", "pe"), 2), ("C0,C3", 4),
])
def test_required_phases(channels, need):
    assert pp.required_phases(recipe(channels=channels) if not isinstance(channels, str)
                              else dict(recipe().to_dict(), channels=channels)) == need


def test_preprocess_rejects_bad_cases():
    phases, mask, affine = constant_case([100, 200, 300])
    with pytest.raises(Her2jaxError, match="empty"):
        pp.preprocess(phases, np.zeros_like(mask), affine, recipe())
    with pytest.raises(Her2jaxError, match="mask shape"):
        pp.preprocess(phases, mask[:-1], affine, recipe())
    with pytest.raises(Her2jaxError, match="C2 needs phase 2"):
        pp.preprocess(phases[:2], mask, affine, recipe())
    with pytest.raises(Her2jaxError, match="affine"):
        pp.preprocess(phases, mask, np.zeros((4, 4)), recipe())


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_spellings():
    fp = pp.recipe_fingerprint(recipes.recipe_config("kinetic"))
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert pp.recipe_fingerprint(recipes.recipe_config("kinetic")) == fp
    as_dict = recipes.recipe_config("kinetic").to_dict()
    as_dict.update(channels=["c1", "sub1", "pe", "ser"], shape=[48, 48, 48], margin_mm=5)
    assert pp.recipe_fingerprint(as_dict) == fp
    fps = {pp.recipe_fingerprint(recipes.recipe_config(n)) for n in recipes.RECIPES}
    assert len(fps) == len(recipes.RECIPES)


@pytest.mark.parametrize("key, value", [
    ("name", "other"), ("channels", ("C1",)), ("shape", (48, 48, 32)), ("margin_mm", 0.5),
    ("spacing_mm", 1.5), ("normalize", "joint"), ("mask_only", True),
    ("largest_component", False),
])
def test_fingerprint_changes_with_every_field(key, value):
    r = recipes.recipe_config("fmbcmri")
    before = pp.recipe_fingerprint(r)
    r[key] = value
    assert pp.recipe_fingerprint(r) != before


@pytest.mark.parametrize("name", ["fmbcmri_subtraction", "kinetic", "multiphase"])
def test_phases_at_the_float32_limits_give_finite_channels(name):
    """Issue 16: C0 at -3e38 and C2 at +3e38 overflowed the subtraction (C2 - C0 = 6e38) and
    ended in an AssertionError. Each channel that leaves float32 is now derived in float64 and
    normalised before it is narrowed; ordinary cases keep the float32 path."""
    rng = np.random.default_rng(0)
    phases = np.stack([rng.uniform(100, 200, (32, 32, 16)).astype(np.float32)
                       for _ in range(3)])
    phases[0], phases[2] = -3e38, 3e38
    mask = np.zeros((32, 32, 16), np.uint8)
    mask[10:20, 10:20, 5:10] = 1
    crop = pp.preprocess(phases, mask, np.eye(4), recipes.recipe_config(name))
    image = crop.image.astype(np.float32)
    assert np.isfinite(image).all() and image.std() > 0
    assert np.abs(image).max() < 20   # z-scores, not values clipped at float16's limit
