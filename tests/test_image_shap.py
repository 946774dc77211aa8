"""Image-space SHAP: exact values on additive models, additivity and seeding, the resampling onto
the original grid checked against the NIfTI files themselves (three orientations), and the
workdir entry point end to end (NIfTI, montage, summary)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from her2jax.analysis import image_shap
from her2jax.data import preprocess, recipes, tfds_builder
from her2jax.errors import Her2jaxError

# One case of each phantom centre: A axial RAS, B axial stored LPS, C sagittal PIR.
ORIENTED = ("PHA_0001", "PHB_0001", "PHC_0001")


def additive_model(weights: np.ndarray):
    """predict_proba whose output k is sum(weights[k] * image): its Shapley values are exact."""
    def predict_proba(images):
        return np.einsum("kdhwc,bdhwc->bk", weights, images)
    return predict_proba


def interacting_model(images):
    """A softmax over 3 classes with products of distant voxels: not additive in the blocks."""
    a = images[:, :4, :4, :4, 0].mean(axis=(1, 2, 3))
    b = images[:, -4:, -4:, -4:, -1].mean(axis=(1, 2, 3))
    c = images[:, 3:9, 2:8, 4:10, :].mean(axis=(1, 2, 3, 4))
    logits = np.stack([a * b, np.tanh(c) + a, b * c - a], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- the explainer


def test_block_edges_follow_array_split():
    for size, blocks in ((24, 4), (7, 3), (10, 10), (9, 2)):
        parts = np.array_split(np.arange(size), blocks)
        expected = np.cumsum([0] + [len(p) for p in parts])
        np.testing.assert_array_equal(image_shap.block_edges(size, blocks), expected)


def test_values_are_exact_for_an_additive_model_on_a_ragged_grid():
    # A ragged grid (7 = 4 + 3, 9 = 3 x 3, 10 = 3 + 3 + 2 + 2) and two channels: any mix-up of
    # block order, channel order or edges gives other numbers.
    rng = np.random.default_rng(1)
    image = rng.standard_normal((7, 9, 10, 2)).astype(np.float16)
    weights = rng.standard_normal((3, 7, 9, 10, 2)) * 0.01
    grid = (2, 3, 4)
    for baseline in ("zero", "blur"):
        result = image_shap.explain_image(additive_model(weights), image, grid=grid,
                                          baseline=baseline, max_evals=2 * 48 + 1,
                                          batch_size=16)
        base = image_shap.baseline_image(image, baseline, result.edges)
        assert result.values.shape == (3, *grid, 2)
        delta = weights * (image.astype(np.float32) - base)
        expected = np.zeros((3, *grid, 2))
        for i, j, k in np.ndindex(*grid):
            (d0, d1), (h0, h1), (w0, w1) = [(e[n], e[n + 1]) for e, n in
                                            zip(result.edges, (i, j, k), strict=True)]
            expected[:, i, j, k] = delta[:, d0:d1, h0:h1, w0:w1].sum(axis=(1, 2, 3))
        np.testing.assert_allclose(result.values, expected, atol=1e-5)
        density = image_shap.crop_density(result.values, result.edges)
        assert density.shape == (3, 7, 9, 10, 2)
        np.testing.assert_allclose(density.sum(axis=(1, 2, 3, 4)), result.values.sum(
            axis=(1, 2, 3, 4)), atol=1e-12)


def test_values_add_up_and_a_seed_repeats_them():
    rng = np.random.default_rng(2)
    image = rng.standard_normal((12, 12, 12, 2)).astype(np.float32)
    calls = []

    def model(images):
        calls.append(len(images))
        return interacting_model(images)

    runs = [image_shap.explain_image(model, image, grid=(3, 3, 3), max_evals=3 * 109,
                                     seed=seed, batch_size=10, baseline="blur")
            for seed in (7, 7, 8)]
    assert set(calls) == {10}   # always full (padded) batches: a jitted model compiles once
    first = runs[0]
    assert first.max_evals == 3 * 109
    np.testing.assert_allclose(first.probs, interacting_model(image[None])[0], atol=1e-7)
    blurred = image_shap.baseline_image(image, "blur", first.edges)
    np.testing.assert_allclose(first.base_values, interacting_model(blurred[None])[0], atol=1e-7)
    # Additivity for every class: sum of values == f(x) - f(baseline).
    gap = first.values.sum(axis=(1, 2, 3, 4)) - (first.probs - first.base_values)
    print("additivity error", np.abs(gap).max())
    assert np.abs(gap).max() < 1e-6
    assert np.abs(first.probs - first.base_values).min() > 1e-3   # not trivially 0 = 0
    np.testing.assert_array_equal(runs[1].values, first.values)
    assert not np.array_equal(runs[2].values, first.values)       # the seed does matter
    # A whole number of permutations, rounded down; below one permutation is refused.
    assert image_shap.explain_image(interacting_model, image, grid=(3, 3, 3),
                                    max_evals=2 * 109 + 50, batch_size=10).max_evals == 218
    with pytest.raises(Her2jaxError, match="max_evals"):
        image_shap.explain_image(interacting_model, image, grid=(3, 3, 3), max_evals=100)
    with pytest.raises(Her2jaxError, match="grid"):
        image_shap.explain_image(interacting_model, image, grid=(13, 2, 2))
    with pytest.raises(Her2jaxError, match="baseline"):
        image_shap.explain_image(interacting_model, image, grid=(2, 2, 2), baseline="mean")


# ----------------------------------------------------------------------------- geometry


def _case(cohort, pid):
    """(phases, mask, affine) read with nibabel, and the Crop with a 10 mm margin."""
    phases = [nib.load(cohort / "images" / pid / f"{pid}_{k:04d}.nii.gz").get_fdata(
        dtype=np.float32) for k in range(3)]
    seg = nib.load(cohort / "segmentations" / "expert" / f"{pid}.nii.gz")
    mask = np.asarray(seg.dataobj) > 0
    recipe = recipes.plain(recipes.data_config("fmbcmri").recipe)
    recipe.update(shape=[24, 24, 24], margin_mm=10.0)
    return mask, seg.affine, preprocess.preprocess(phases, mask, seg.affine, recipe)


def _world(shape, affine):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def right_half_maps(phantom_cohort):
    """Per oriented case: (mask, affine, crop, crop density) of a model that looks only at
    tumour voxels in the crop's first half along canonical axis 0 (world x, towards the
    patient's left)."""
    maps = {}
    for pid in ORIENTED:
        mask, affine, crop = _case(phantom_cohort, pid)
        region = crop.mask > 0
        region[crop.image.shape[0] // 2:] = False

        def predict_proba(images, region=region):
            score = (images[..., 0] ** 2 * region).sum(axis=(1, 2, 3)) / region.sum()
            p = 1 / (1 + np.exp(-(score - 1)))
            return np.stack([1 - p, p], axis=1)

        # 8^3 blocks of 3 crop voxels (~5 mm here): the half-plane d = 12 is a block boundary.
        result = image_shap.explain_image(predict_proba, crop.image, grid=(8, 8, 8),
                                          max_evals=2 * 512 + 1, batch_size=64)
        density = image_shap.crop_density(result.values[1], result.edges).sum(axis=-1)
        maps[pid] = mask, affine, crop, density
    return maps


def _side_fractions(original, mask, affine):
    """(share of |mass| in the mask dilated by 2 voxels and not beyond the tumour's centre
    along world x, share beyond it): the centre is the tumour box's, which the crop is
    centred on, and the tolerance a quarter source voxel (where a voxel column sits on it)."""
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1   # preprocess keeps all of it
    world_x = _world(mask.shape, affine)[..., 0]
    centre = (world_x[mask].min() + world_x[mask].max()) / 2
    tol = 0.25 * np.abs(affine[0, :3]).max()
    near = ndimage.binary_dilation(mask, np.ones((3, 3, 3)), iterations=2)
    mass = np.abs(original)
    return (mass[near & (world_x <= centre + tol)].sum() / mass.sum(),
            mass[world_x > centre + tol].sum() / mass.sum())


@pytest.mark.parametrize("pid", ORIENTED)
def test_the_original_grid_map_lands_on_the_tumour_half_the_model_looks_at(right_half_maps,
                                                                          pid):
    mask, affine, crop, density = right_half_maps[pid]
    assert nib.aff2axcodes(affine) == {"PHA": ("R", "A", "S"), "PHB": ("L", "P", "S"),
                                       "PHC": ("P", "I", "R")}[pid[:3]]
    original = image_shap.to_original(density, crop.crop_affine, crop.source_affine,
                                      crop.source_shape)
    assert original.shape == mask.shape and original.dtype == np.float32
    good, wrong_side = _side_fractions(original, mask, affine)
    print(pid, "near tumour and on its half", round(good, 3), "beyond", round(wrong_side, 3))
    assert good >= 0.9 and wrong_side <= 0.05   # linear interpolation blurs ~1 crop voxel
    # The same map with the crop's axis 0 flipped, or axes 0 and 1 swapped, lands elsewhere.
    n = density.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    for wrong in (crop.crop_affine @ flip, crop.crop_affine @ swap):
        bad = image_shap.to_original(density, wrong, crop.source_affine, crop.source_shape)
        good_bad, _ = _side_fractions(bad, mask, affine)
        print(pid, "wrong affine", round(good_bad, 3))
        assert good_bad < 0.85


@pytest.mark.parametrize("pid", ORIENTED)
def test_resampling_keeps_the_mass(right_half_maps, pid):
    mask, affine, crop, density = right_half_maps[pid]
    dense = np.random.default_rng(3).uniform(0, 1, density.shape)   # mass up to the crop edge
    for name, crop_map in (("shap", density), ("dense", dense)):
        original = image_shap.to_original(crop_map, crop.crop_affine, crop.source_affine,
                                          crop.source_shape)
        ratio = original.sum() / crop_map.sum()
        print(pid, name, "original / crop total", round(float(ratio), 4))
        assert abs(ratio - 1) < 0.05
    # Nothing lands on source voxels that do not overlap the crop's extent (its edge voxels
    # reach half a crop voxel beyond their centres; a source voxel half a source voxel).
    original = image_shap.to_original(dense, crop.crop_affine, crop.source_affine,
                                      crop.source_shape)
    to_crop = np.linalg.inv(crop.crop_affine)
    index = _world(mask.shape, affine) @ to_crop[:3, :3].T + to_crop[:3, 3]
    slack = 0.5 * np.abs(to_crop[:3, :3] @ affine[:3, :3]).sum(axis=1)   # per crop axis
    outside = np.any((index < -0.5 - slack) | (index > np.array(density.shape) - 0.5 + slack),
                     axis=-1)
    assert outside.any() and not original[outside].any()
    assert (original >= 0).all() and original[~outside].max() > 0


# ----------------------------------------------------------------------------- workdir


def _tumour_and_rim(mask: np.ndarray, zooms) -> tuple[np.ndarray, np.ndarray]:
    """(the tumour grown by its oedema rim, the tumour's bounding box) on the source grid.

    The phantom's oedema ring is edema_width x radius wide, edema_width = 0.3 exp(0.5 z)
    (medians 0.26 / 0.3 / 0.44 of the radius for zero / low / positive), so half the
    equivalent-sphere radius covers a typical rim; plus half the largest voxel edge, since a
    mask voxel is one whose centre is inside the tumour, whose edge can lie half a voxel out.
    """
    zooms = np.asarray(zooms, np.float64)
    radius = (3 * mask.sum() * np.prod(zooms) / (4 * np.pi)) ** (1 / 3)
    rim = ndimage.distance_transform_edt(~mask, sampling=zooms) <= 0.5 * radius + zooms.max() / 2
    box = np.zeros_like(mask)
    box[ndimage.find_objects(mask.astype(np.uint8))[0]] = True
    return rim, box


def test_explain_workdir_writes_maps_montages_and_summary(trained, phantom_cohort, dataset,
                                                          tmp_path):
    workdir = trained[0]
    out = tmp_path / "analysis" / "shap"
    # 2 permutations of 64 blocks: a tiny ViT's values are noisy anyway; the files and the
    # geometry are what is checked here.
    summary = image_shap.explain_workdir(workdir, out, per_class=1, grid=(4, 4, 4),
                                         max_evals=2 * 129, batch_size=64, progress=False)
    json.dumps(summary)
    assert summary["method"] == "permutation" and summary["grid"] == [4, 4, 4]
    assert summary["max_evals"] == 258 and summary["baseline"] == "zero"
    cases = summary["cases"]
    assert [c["label"] for c in cases] == ["HER2-zero", "HER2-low", "HER2-positive"]
    assert all(c["split"] == "test_CENTER_C" and c["center"] == "CENTER_C" for c in cases)
    assert all(c["explained_class"] == c["label"] for c in cases)
    for c in cases:
        assert abs(c["attribution_sum"] - (c["probability"] - c["base_value"])) < 1e-5
        assert 0 <= c["fraction_in_tumour"] <= 1
    # The chosen case of each class is that class's most confident one in the test centre.
    frame = _test_probabilities(workdir, dataset)
    for c in cases:
        members = frame[frame["label"] == c["label"]]
        best = members.loc[members[f"prob_{c['label']}"].idxmax()]
        assert c["patient_id"] == best["patient_id"]
        assert c["probability"] == pytest.approx(best[f"prob_{c['label']}"], abs=1e-5)

    # Two more orientations (training centres A and B) by patient id.
    more = image_shap.explain_workdir(workdir, out, patients=["PHA_0002", "PHB_0003"],
                                      grid=(4, 4, 4), max_evals=2 * 129, batch_size=64,
                                      progress=False)["cases"]
    assert [c["patient_id"] for c in more] == ["PHA_0002", "PHB_0003"]
    assert all(c["split"] in ("train", "val") for c in more)
    fractions = {}
    for c in cases + more:
        pid = c["patient_id"]
        assert c["files"] == {"crop_map": f"shap/{pid}_shap_crop.nii.gz",
                              "original_map": f"shap/{pid}_shap_original.nii.gz",
                              "crop_image": f"shap/{pid}_crop.nii.gz",
                              "montage": f"shap/{pid}_montage.png"}
        example = _example(dataset, pid)
        source = nib.load(phantom_cohort / "images" / pid / f"{pid}_0000.nii.gz")
        crop_map = nib.load(out.parent / c["files"]["crop_map"])
        original = nib.load(out.parent / c["files"]["original_map"])
        crop_image = nib.load(out.parent / c["files"]["crop_image"])
        assert crop_map.shape == example["image"].shape and crop_map.get_data_dtype() == "<f4"
        np.testing.assert_allclose(crop_map.affine, example["crop_affine"], atol=1e-4)
        np.testing.assert_allclose(crop_image.affine, example["crop_affine"], atol=1e-4)
        np.testing.assert_array_equal(crop_image.get_fdata(dtype=np.float32),
                                      example["image"].astype(np.float32))
        assert original.shape == source.shape
        np.testing.assert_allclose(original.affine, source.affine, atol=1e-4)
        crop_values = crop_map.get_fdata()
        assert crop_values.sum() == pytest.approx(c["attribution_sum"], abs=1e-5)
        values = original.get_fdata()
        assert values.sum() == pytest.approx(crop_values.sum(), rel=0.05, abs=1e-4)
        seg = nib.load(phantom_cohort / "segmentations" / "expert" / f"{pid}.nii.gz")
        rim, box = _tumour_and_rim(np.asarray(seg.dataobj) > 0, seg.header.get_zooms()[:3])
        mass = np.abs(values)
        # The crop (fmbcmri: margin 0) is the tumour's box: all of the map lands on it.
        assert mass[box].sum() >= 0.999 * mass.sum()
        fractions[pid] = float(mass[rim].sum() / mass.sum())
        montage = Image.open(out.parent / c["files"]["montage"])
        assert montage.width > 100 and montage.height > 100
        pixels = np.asarray(montage.convert("RGB"), np.float32)
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    print("original-space |mass| in tumour + rim", fractions)
    # Measured (seeds 0-3): 0.52-0.59 for PHC_0007 (radius 5 mm, about one voxel, where the
    # 12-step model weighs the box's corners more than the tumour), 0.72-1.0 for the others,
    # mean 0.85; mass spread uniformly over the box would give 0.83-1.0.
    assert min(fractions.values()) > 0.45 and np.mean(list(fractions.values())) > 0.6
    assert not list(out.glob(".*"))   # no temporary files left behind

    with pytest.raises(Her2jaxError, match="NOPE_0001"):
        image_shap.explain_workdir(workdir, out, patients=["NOPE_0001"], progress=False)


def _test_probabilities(workdir, dataset):
    """predictions of the test centre, as eval writes them."""
    import pandas as pd

    from her2jax.data import pipeline
    from her2jax.train import inference
    from her2jax.train import step as step_lib

    model = inference.load_trained(workdir)
    split = pipeline.named_splits(dataset, model.config.data, ["test_CENTER_C"])["test_CENTER_C"]
    probs, _ = inference.predict_split(step_lib.make_predict(model.graphdef), model.state, dataset,
                                  split, model.mesh, 8)
    frame = pd.DataFrame({"patient_id": split.patient_ids,
                          "label": [split.class_names[y] for y in split.labels]})
    for k, name in enumerate(split.class_names):
        frame[f"prob_{name}"] = probs[:, k]
    return frame


def _example(dataset, pid):
    row = next(r for r in dataset.index if r["patient_id"] == pid)
    return tfds_builder.data_source(dataset.path, row["split"])[row["position"]]


def test_pca_lr_workdirs_are_refused(trained, tmp_path):
    workdir = tmp_path / "pca"
    workdir.mkdir()
    shutil.copy(trained[0] / "config.json", workdir / "config.json")
    record = json.loads((workdir / "config.json").read_text())
    record["config"]["train"]["protocol"] = "pca_lr"
    (workdir / "config.json").write_text(json.dumps(record))
    with pytest.raises(Her2jaxError, match="no image model"):
        image_shap.explain_workdir(workdir, tmp_path / "shap", progress=False)
