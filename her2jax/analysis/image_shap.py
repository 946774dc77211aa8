"""Image-space SHAP: which parts of a crop drive a class, as NIfTI heatmaps on the crop and on
the patient's original image grid.

SHAP has no Flax support, so the model is any batched ``predict_proba`` (images -> class
probabilities) and the features are coarse, not voxels:

1. **Features.** The crop [D, H, W, C] is cut into a ``grid`` of supervoxel blocks over D, H, W
   (``np.array_split``'s boundaries: the first ``D mod gD`` blocks are one voxel longer), one
   feature per block and channel: M = gD * gH * gW * C binary features.
2. **Masking.** A switched-off feature's voxels take the baseline's values: ``zero`` (0 is the
   crop's mean after the recipe's z-score) or ``blur`` (a Gaussian-blurred copy of the crop, with
   sigma half a block: the block keeps its surroundings' mean intensity but loses its detail).
3. **Shapley values.** ``shap.PermutationExplainer`` on the binary vector: the explained point
   is ones(M), the background zeros(M); the wrapped function turns each 0/1 row into a composed
   image and calls ``predict_proba`` in fixed-size batches (the last one padded), so a jitted
   model compiles once. Each permutation is walked forward and backward (antithetic), so the
   values add up exactly: ``values[k].sum() == f(x)[k] - f(baseline)[k]`` for every class k.
   The permutations come from numpy's global generator, seeded from ``seed`` and restored
   afterwards, so a seed gives the same values.
4. **Crop maps.** A block's value spread evenly over its voxels: a density per crop voxel
   whose sum over the block is the block's value (:func:`crop_density`).
5. **Original grid.** :func:`to_original` integrates the channel-summed density over every source
   voxel the crop overlaps (linear interpolation at sub-voxel points, world coordinates through
   the two affines), scaled by the ratio of voxel volumes, so each source voxel holds its share
   of the attribution and the map's total is the crop's total.

:func:`explain_workdir` runs it on a trained workdir: it picks the cases (given patients, or per
class the most confidently predicted cases of that true class), explains the true class (the
predicted one when unknown) and writes per case ``<pid>_shap_crop.nii.gz``,
``<pid>_shap_original.nii.gz``, ``<pid>_crop.nii.gz`` and ``<pid>_montage.png``.

Cost: a case takes ``max_evals`` model evaluations (default 10 permutations: 1,290 for 4^3
blocks of one channel); shap compiles its numba kernels on first use in a process (~5 s on
2 CPU cores: ``numba_cache`` keeps most of them on disk, not the one that takes shap's link
function).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from her2jax import fileio
from her2jax import labels as labels_lib
from her2jax.analysis import numba_cache
from her2jax.data import pipeline, tfds_builder
from her2jax.data.preprocess import Crop
from her2jax.errors import Her2jaxError
from her2jax.train import inference, pca_lr
from her2jax.train import step as step_lib
from her2jax.train import workdir as workdir_lib

METHOD = "permutation"
BASELINES = ("zero", "blur")
DEFAULT_PERMUTATIONS = 10       # shap's own default for the Permutation explainer
MAX_SUPERSAMPLE = 8             # sub-samples per source axis when resampling onto the source
_MONTAGE_FRACTIONS = (0.25, 0.5, 0.75)   # slices at these fractions of the tumour's extent


@dataclasses.dataclass(frozen=True)
class ImageExplanation:
    """Shapley values of one crop's supervoxel features.

    Attributes:
      values: [K, gD, gH, gW, C] float64, per class the value of every block and channel.
      base_values: [K] float64, f(baseline): every feature switched off.
      probs: [K] float64, f(x): the crop as it is.
      edges: per axis D, H, W the block boundaries ([g + 1] int64, from 0 to the axis length).
      baseline: 'zero' or 'blur'.
      max_evals: the evaluation budget used (a whole number of permutations).
    """

    values: np.ndarray
    base_values: np.ndarray
    probs: np.ndarray
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]
    baseline: str
    max_evals: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The crop's spatial shape (D, H, W)."""
        return tuple(int(e[-1]) for e in self.edges)


# ----------------------------------------------------------------------------- features


def block_edges(size: int, blocks: int) -> np.ndarray:
    """[blocks + 1] boundaries splitting ``size`` voxels like ``np.array_split`` (the first
    ``size mod blocks`` blocks one voxel longer)."""
    base, extra = divmod(int(size), int(blocks))
    lengths = np.full(int(blocks), base, np.int64)
    lengths[:extra] += 1
    return np.concatenate([[0], np.cumsum(lengths)])


def _check_grid(grid, shape) -> tuple[int, int, int]:
    if (isinstance(grid, str) or not isinstance(grid, Sequence) or len(grid) != 3
            or not all(isinstance(g, int | np.integer) and not isinstance(g, bool) and g > 0
                       for g in grid)):
        raise Her2jaxError(f"grid must be 3 positive integers (blocks over D, H, W), got {grid!r}",
                           key="grid")
    grid = tuple(int(g) for g in grid)
    if any(g > n for g, n in zip(grid, shape, strict=True)):
        raise Her2jaxError(f"grid {grid} has more blocks than the crop {tuple(shape)} has voxels",
                           key="grid")
    return grid


def default_max_evals(num_features: int, permutations: int = DEFAULT_PERMUTATIONS) -> int:
    """Evaluations for ``permutations`` antithetic permutations of ``num_features`` features
    (each costs 2 M + 1 model calls)."""
    return int(permutations) * (2 * int(num_features) + 1)


def baseline_image(image: np.ndarray, baseline: str, edges) -> np.ndarray:
    """What a switched-off feature's voxels show.

    Args:
      image: [D, H, W, C] the crop.
      baseline: 'zero' (the z-scored crop's mean) or 'blur' (Gaussian blur, sigma half a
        block along each axis, per channel).
      edges: the block boundaries per axis (:func:`block_edges`).

    Returns:
      [D, H, W, C] float32.
    """
    image = np.asarray(image, np.float32)
    if baseline == "zero":
        return np.zeros_like(image)
    if baseline == "blur":
        sigma = [float(e[-1]) / (len(e) - 1) / 2 for e in edges] + [0.0]
        return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest").astype(np.float32)
    raise Her2jaxError(f"unknown baseline {baseline!r} (expected {' or '.join(BASELINES)})",
                       key="baseline")


def _expand(blocks: np.ndarray, edges) -> np.ndarray:
    """[..., gD, gH, gW, C] -> [..., D, H, W, C], every block value repeated over its voxels."""
    for axis, e in zip((-4, -3, -2), edges, strict=True):
        blocks = np.repeat(blocks, np.diff(e), axis=axis)
    return blocks


def crop_density(values: np.ndarray, edges) -> np.ndarray:
    """Attribution per crop voxel: each block's value divided evenly over its voxels.

    Args:
      values: [..., gD, gH, gW, C] block values (e.g. ``ImageExplanation.values[k]``).
      edges: the block boundaries per axis.

    Returns:
      [..., D, H, W, C] float64, summing over each block's voxels to the block's value.
    """
    sizes = [np.diff(e).astype(np.float64) for e in edges]
    volume = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    return _expand(np.asarray(values, np.float64) / volume[..., None], edges)


# ----------------------------------------------------------------------------- explainer


def explain_image(predict_proba: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *,
                  grid: Sequence[int] = (4, 4, 4), baseline: str = "zero",
                  max_evals: int | None = None, seed: int = 0, batch_size: int = 32,
                  progress: bool = False, desc: str | None = None) -> ImageExplanation:
    """Permutation SHAP of a crop's supervoxel blocks, for every class.

    Args:
      predict_proba: ``images [batch_size, D, H, W, C] float32 -> [batch_size, K]``
        probabilities; always called with exactly ``batch_size`` rows (padding rows repeat
        the first row and are dropped).
      image: [D, H, W, C] the crop (any float dtype).
      grid: blocks over D, H, W (each at most that axis's length).
      baseline: 'zero' or 'blur' (see :func:`baseline_image`).
      max_evals: model evaluations (default: 10 permutations, ``10 (2 M + 1)``); rounded down
        to whole permutations, at least ``2 M + 1``.
      seed: seeds the permutations.
      batch_size: images per ``predict_proba`` call.
      progress: a tqdm bar over the model evaluations.
      desc: the bar's label (e.g. the patient id).

    Returns:
      The ImageExplanation; ``values[k].sum() == probs[k] - base_values[k]`` up to float error.

    Raises:
      Her2jaxError: a bad grid, baseline or max_evals, or an image that is not [D, H, W, C].
    """
    shap = numba_cache.import_cached("shap")

    image = np.asarray(image, np.float32)
    if image.ndim != 4:
        raise Her2jaxError(f"the crop must be [D, H, W, C], got shape {image.shape}")
    grid = _check_grid(grid, image.shape[:3])
    edges = tuple(block_edges(n, g) for n, g in zip(image.shape[:3], grid, strict=True))
    background = baseline_image(image, baseline, edges)
    num_features = int(np.prod(grid)) * image.shape[3]
    per_permutation = 2 * num_features + 1
    max_evals = default_max_evals(num_features) if max_evals is None else int(max_evals)
    if max_evals < per_permutation:
        raise Her2jaxError(f"max_evals {max_evals} is below one permutation of the "
                           f"{num_features} features (2 M + 1 = {per_permutation})",
                           key="max_evals")
    max_evals -= max_evals % per_permutation
    if batch_size < 1:
        raise Her2jaxError(f"must be positive, got {batch_size}", key="batch_size")

    bar = tqdm(total=max_evals + 2, desc=desc, unit="eval", disable=not progress, leave=False)

    def on_features(rows: np.ndarray) -> np.ndarray:
        """[n, M] 0/1 rows -> [n, K] probabilities of the composed images."""
        keep = np.asarray(rows) > 0.5
        outputs = []
        for start in range(0, len(keep), batch_size):
            chunk = keep[start:start + batch_size]
            n = len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
            switched = _expand(chunk.reshape(batch_size, *grid, image.shape[3]), edges)
            composed = np.where(switched, image, background)
            probs = np.asarray(predict_proba(composed), np.float64)
            if probs.ndim != 2 or len(probs) != batch_size:
                raise ValueError(f"predict_proba returned shape {probs.shape} for "
                                 f"{batch_size} images; expected [{batch_size}, K]")
            outputs.append(probs[:n])
            bar.update(n)
        return np.concatenate(outputs)

    state = np.random.get_state()   # the explainer seeds and draws from the global generator
    try:
        explainer = shap.PermutationExplainer(
            on_features, shap.maskers.Independent(np.zeros((1, num_features))), seed=seed)
        result = explainer(np.ones((1, num_features)), max_evals=max_evals,
                           batch_size=per_permutation, silent=True)
        ends = on_features(np.array([np.ones(num_features), np.zeros(num_features)]))
    finally:
        np.random.set_state(state)
        bar.close()
    values = np.asarray(result.values[0], np.float64)            # [M, K]
    num_classes = values.shape[1]
    values = values.T.reshape(num_classes, *grid, image.shape[3])
    return ImageExplanation(values=values,
                            base_values=np.asarray(result.base_values[0], np.float64),
                            probs=ends[0], edges=edges, baseline=baseline, max_evals=max_evals)


# ----------------------------------------------------------------------------- original grid


def to_original(density: np.ndarray, crop_affine: np.ndarray, source_affine: np.ndarray,
                source_shape: Sequence[int], *,
                max_supersample: int = MAX_SUPERSAMPLE) -> np.ndarray:
    """A crop-space density map resampled onto the source image's grid, mass kept.

    Each source voxel whose extent overlaps the crop's gets the mean of the density over
    sub-voxel points (linear interpolation; zero outside the crop's extent, i.e. beyond the
    outer half-voxel of its edge voxels), times the ratio of voxel volumes
    ``|det(source_affine)| / |det(crop_affine)|``: a source voxel holds its share of the
    attribution, and the map's total is the crop's (within ~2 % on the phantom's crops; plain
    point sampling at voxel centres is off by up to 30 % where source voxels are larger than
    crop voxels). Sub-samples per source axis: twice the number of crop voxels a source voxel
    spans along it, 1 to ``max_supersample``; the work is then about (2 x crop side)^3 points
    whatever the voxel sizes.

    Args:
      density: [D, H, W] attribution per crop voxel.
      crop_affine: [4, 4] crop voxel index -> world mm (``Crop.crop_affine``).
      source_affine: [4, 4] source voxel index -> world mm (the NIfTI affine).
      source_shape: (X, Y, Z) of the source image.
      max_supersample: cap on sub-samples per source axis.

    Returns:
      [X, Y, Z] float32, zero where the crop does not reach.
    """
    density = np.asarray(density, np.float64)
    if density.ndim != 3:
        raise ValueError(f"density must be [D, H, W], got {density.shape}")
    shape = np.asarray(source_shape, np.int64)
    source_to_crop = np.linalg.inv(np.asarray(crop_affine, np.float64)) @ np.asarray(
        source_affine, np.float64)
    crop_to_source = np.linalg.inv(source_to_crop)
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in density.shape])))
    reach = corners @ crop_to_source[:3, :3].T + crop_to_source[:3, 3]
    lo = np.clip(np.floor(reach.min(axis=0) - 0.5).astype(np.int64), 0, shape)
    hi = np.clip(np.ceil(reach.max(axis=0) + 0.5).astype(np.int64) + 1, 0, shape)
    out = np.zeros(tuple(shape), np.float32)
    if np.any(hi <= lo):
        return out
    index = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi,
                                                                                    strict=True)],
                                 indexing="ij")).reshape(3, -1)
    spans = np.linalg.norm(source_to_crop[:3, :3], axis=0)   # crop voxels per source voxel
    counts = np.clip(np.ceil(2 * spans - 1e-6).astype(np.int64), 1, int(max_supersample))
    offsets = [(np.arange(s) + 0.5) / s - 0.5 for s in counts]
    limit = np.asarray(density.shape, np.float64)[:, None] - 0.5
    total = np.zeros(index.shape[1])
    for offset in itertools.product(*offsets):
        points = source_to_crop[:3, :3] @ (index + np.asarray(offset)[:, None]) \
            + source_to_crop[:3, 3:]
        inside = np.all((points >= -0.5) & (points <= limit), axis=0)
        total += ndimage.map_coordinates(density, points, order=1, mode="nearest") * inside
    total *= abs(np.linalg.det(source_to_crop[:3, :3])) / np.prod(counts)
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = total.reshape(hi - lo)
    return out


# ----------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` by name to a temporary file beside ``path`` (with the same suffixes:
    nibabel picks the format from them), then one rename (``fileio.atomic_write``)."""
    fileio.atomic_write(path, write_path=write, suffix=f".tmp{''.join(path.suffixes)}")


def save_nifti(path, data: np.ndarray, affine: np.ndarray) -> None:
    """float32 NIfTI-1 with the affine as qform and sform (scanner mm), written atomically."""
    image = nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    _atomic(Path(path), lambda tmp: nib.save(image, tmp))


def _slices(mask: np.ndarray) -> list[list[int]]:
    """Per canonical axis, the slice indices at ``_MONTAGE_FRACTIONS`` of the tumour's extent
    (of the whole crop when the mask is empty)."""
    out = []
    for axis in range(3):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        a, b = (present[0], present[-1]) if len(present) else (0, mask.shape[axis] - 1)
        out.append(sorted({int(round(a + f * (b - a))) for f in _MONTAGE_FRACTIONS}))
    return out


def write_montage(path, image: np.ndarray, mask: np.ndarray, density: np.ndarray,
                  crop_affine: np.ndarray, title: str) -> None:
    """Axial, coronal and sagittal slices of the crop through the tumour, the heatmap on top.

    Args:
      path: the PNG to write (atomically).
      image: [D, H, W, C] the crop (channel 0 is shown), canonical RAS axes.
      mask: [D, H, W] the tumour mask (drawn as a contour).
      density: [D, H, W] the heatmap (diverging colours, limits symmetric about 0).
      crop_affine: gives the crop's voxel sizes, so slices keep their physical aspect.
      title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.pyplot as plt

    grey = np.asarray(image[..., 0], np.float32)
    grey_range = np.percentile(grey, [1, 99])
    spacing = np.linalg.norm(np.asarray(crop_affine)[:3, :3], axis=0)
    limit = float(np.abs(density).max()) or 1.0
    norm = matplotlib.colors.Normalize(-limit, limit)
    cmap = matplotlib.colormaps["RdBu_r"]
    slices = _slices(mask)
    # (fixed axis, name, horizontal, vertical): RAS axes 0 -> patient's right, 1 -> anterior,
    # 2 -> superior, so the patient's right is on the image's right (neurological view).
    views = ((2, "axial", "LR", "PA"), (1, "coronal", "LR", "IS"), (0, "sagittal", "PA", "IS"))
    columns = max(len(s) for s in slices)
    fig, axes = plt.subplots(3, columns, figsize=(2.8 * columns + 1.4, 8.6), squeeze=False,
                             layout="constrained")
    try:
        for row, (axis, name, across, up) in enumerate(views):
            h_axis, v_axis = [a for a in range(3) if a != axis]
            aspect = spacing[v_axis] / spacing[h_axis]   # keeps millimetres square
            for col in range(columns):
                ax = axes[row, col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(slices[axis]):
                    ax.axis("off")
                    continue
                k = slices[axis][col]
                take = tuple(k if a == axis else slice(None) for a in range(3))
                ax.imshow(grey[take].T, cmap="gray", vmin=grey_range[0], vmax=grey_range[1],
                          origin="lower", aspect=aspect)
                # Opacity grows with |value|: anatomy stays visible where attribution is small.
                heat = cmap(norm(density[take].T))
                heat[..., 3] = 0.8 * np.clip(np.abs(density[take].T) / limit, 0, 1)
                ax.imshow(heat, origin="lower", aspect=aspect)
                if mask[take].any():
                    ax.contour(mask[take].T, levels=[0.5], colors="yellow", linewidths=0.8)
                ax.set_title(f"{name} {k}", fontsize=9)
                ax.set_xlabel(f"{across[0]}  \u2192  {across[1]}", fontsize=8)
                ax.set_ylabel(f"{up[0]}  \u2192  {up[1]}", fontsize=8)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=axes, shrink=0.6,
                     label="SHAP value per voxel (channels summed)")
        fig.suptitle(title, fontsize=10)
        _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def case_paths(out_dir, patient_id: str) -> dict[str, Path]:
    """Where :func:`write_case` puts a case's files."""
    out_dir = Path(out_dir)
    return {"crop_map": out_dir / f"{patient_id}_shap_crop.nii.gz",
            "original_map": out_dir / f"{patient_id}_shap_original.nii.gz",
            "crop_image": out_dir / f"{patient_id}_crop.nii.gz",
            "montage": out_dir / f"{patient_id}_montage.png"}


def write_case(out_dir, patient_id: str, crop: Crop, explanation: ImageExplanation,
               explained: int, title: str) -> dict[str, Path]:
    """The four files of one explained case.

    Args:
      out_dir: the folder (created if missing).
      patient_id: names the files.
      crop: the case's Crop (image, mask and geometry).
      explanation: :func:`explain_image`'s result for ``crop.image``.
      explained: the class whose map is written.
      title: the montage's title.

    Returns:
      {"crop_map", "original_map", "crop_image", "montage"} -> path.
    """
    paths = case_paths(out_dir, patient_id)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    density = crop_density(explanation.values[explained], explanation.edges)   # [D, H, W, C]
    summed = density.sum(axis=-1)
    original = to_original(summed, crop.crop_affine, crop.source_affine, crop.source_shape)
    save_nifti(paths["crop_map"], density, crop.crop_affine)
    save_nifti(paths["original_map"], original, crop.source_affine)
    save_nifti(paths["crop_image"], crop.image, crop.crop_affine)
    write_montage(paths["montage"], crop.image, crop.mask, summed, crop.crop_affine, title)
    return paths


def fraction_in_mask(density: np.ndarray, mask: np.ndarray) -> float:
    """Share of the |attribution| mass of a [D, H, W] map that lies where ``mask`` > 0."""
    mass = np.abs(np.asarray(density, np.float64))
    total = float(mass.sum())
    return float(mass[np.asarray(mask) > 0].sum()) / total if total > 0 else 0.0


# ----------------------------------------------------------------------------- workdir


@dataclasses.dataclass(frozen=True)
class _Case:
    patient_id: str
    center: str
    split: str          # the named split (train / val / test_<centre>) or the centre
    tfds_split: str
    position: int
    label: int          # -1 unknown


def _model_predict_proba(trained, predict, batch_size: int) -> Callable[[np.ndarray],
                                                                      np.ndarray]:
    """The workdir's model (``step.make_predict``'s ``predict``) as
    ``[batch_size, D, H, W, C] -> [batch_size, K]`` probabilities.

    Every process calls it with the same images and feeds its own rows of the global batch.
    """
    rows = pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())

    def predict_proba(images: np.ndarray) -> np.ndarray:
        batch = pipeline.to_global({"image": np.asarray(images, np.float32)[rows]},
                                   trained.mesh)
        probs, _ = predict(trained.state.params, trained.state.rest, batch["image"])
        return inference.gather(probs)

    return predict_proba


def _default_split_names(config) -> list[str]:
    """The test centres' splits; val when no centre is held out."""
    tests = [f"test_{tfds_builder.split_name(c)}" for c in config.data.test_centers]
    return tests or ["val"]


def _find_patients(dataset, data_config, patients: Sequence[str],
                   splits: Sequence[str] | None) -> list[_Case]:
    """The cases of the given patient ids, looked up in ``splits`` (default: every example of
    the dataset, labelled or not)."""
    found: dict[str, _Case] = {}
    if splits:
        for name, split in pipeline.named_splits(dataset, data_config, splits).items():
            for pid, center, (s, pos), y in zip(split.patient_ids, split.centers, split.keys,
                                                split.labels, strict=True):
                found.setdefault(pid, _Case(pid, center, name, split.tfds_splits[int(s)],
                                            int(pos), int(y)))
        scope = "split(s) " + ", ".join(splits)
    else:
        owner = {pid: name for name, split in pipeline.select_splits(dataset, data_config).items()
                 for pid in split.patient_ids}
        for row in dataset.index:
            y, _ = labels_lib.derive_label(data_config.scheme, row["ihc"], row["ish"],
                                           row["her2"])
            pid = row["patient_id"]
            found[pid] = _Case(pid, row["center"], owner.get(pid, row["center"]), row["split"],
                               int(row["position"]), -1 if y is None else int(y))
        scope = "the dataset"
    cases = []
    for pid in dict.fromkeys(str(p) for p in patients):
        if pid not in found:
            raise Her2jaxError(f"not in {scope} ({len(found)} patients, e.g. "
                               f"{', '.join(sorted(found)[:3])})", patient=pid, key="patients")
        cases.append(found[pid])
    return cases


def _top_confident(cases: list[_Case], probs: np.ndarray, num_classes: int,
                   per_class: int) -> list[_Case]:
    """Per true class, the ``per_class`` cases with the highest probability of that class
    (ties: patient id order)."""
    chosen = []
    for k in range(num_classes):
        members = [i for i, c in enumerate(cases) if c.label == k]
        members.sort(key=lambda i: (-probs[i, k], cases[i].patient_id))
        chosen += [cases[i] for i in members[:per_class]]
    return chosen


def explain_workdir(workdir, out_dir, *, splits: Sequence[str] | None = None,
                    patients: Sequence[str] = (), per_class: int = 1, which: str = "best",
                    data_dir: str | None = None, grid: Sequence[int] = (4, 4, 4),
                    baseline: str = "zero", max_evals: int | None = None, seed: int = 0,
                    batch_size: int | None = None, progress: bool = True) -> dict:
    """Image-space SHAP of a trained workdir's model on a few cases, written as NIfTI and PNG.

    Args:
      workdir: a trained (gradient) workdir; PCA + LR workdirs have no image model to explain.
      out_dir: the folder for the files (the stage passes ``<workdir>/analysis/shap``);
        summary paths are relative to its parent.
      splits: where cases come from: names of ``pipeline.named_splits`` (``val``,
        ``test_<centre>``, ``train``, or a centre). Default: the test centres' splits (val when
        none is held out) for ``per_class``; the whole dataset for ``patients``.
      patients: explain these patient ids (any label, even unknown) instead of choosing.
      per_class: without ``patients``, per true class the cases with the highest predicted
        probability of that class.
      which: the checkpoint, 'best' or 'latest'.
      data_dir: where the prepared dataset is now (default: the config's).
      grid: supervoxel blocks over the crop's D, H, W.
      baseline: 'zero' or 'blur' (what a switched-off block shows).
      max_evals: model evaluations per case (default: 10 permutations).
      seed: seeds the permutations (every case uses the same seed).
      batch_size: images per model call (default: the config's ``train.eval_batch_size``,
        rounded to the device count).
      progress: a tqdm bar over cases and one over each case's evaluations.

    Returns:
      A JSON-able summary ``{"method", "baseline", "grid", "max_evals", "seed", "checkpoint",
      "step", "class_names", "cases": [{"patient_id", "center", "split", "label" (class name
      or None), "predicted_class", "explained_class", "probability" (of the explained class),
      "base_value", "attribution_sum", "fraction_in_tumour" (share of the crop map's |mass|
      inside the crop's tumour mask), "files": {"crop_map", "original_map", "crop_image",
      "montage"}}]}``.

    Raises:
      Her2jaxError: a PCA + LR workdir, an unknown split or patient, bad grid / baseline /
        max_evals / per_class.
    """
    workdir, out_dir = Path(workdir), Path(out_dir)
    splits = [splits] if isinstance(splits, str) else splits
    patients = [patients] if isinstance(patients, str) else list(patients)
    if pca_lr.is_pca_lr(workdir):
        raise Her2jaxError("is a PCA + logistic regression workdir: it has no image model for "
                           "image-space SHAP (its feature-space SHAP is in --mode=analyze)",
                           file=str(workdir))
    if baseline not in BASELINES:
        raise Her2jaxError(f"unknown baseline {baseline!r} (expected {' or '.join(BASELINES)})",
                           key="baseline")
    if not patients and int(per_class) < 1:
        raise Her2jaxError(f"must be at least 1, got {per_class}", key="per_class")
    config = ml_collections.ConfigDict(workdir_lib.read(workdir)["config"])
    if data_dir:
        config.data.data_dir = data_dir
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    crop_shape = [int(n) for n in dataset.meta["image_shape"]]
    grid = _check_grid(grid, crop_shape[:3])
    num_features = int(np.prod(grid)) * crop_shape[3]
    evals = default_max_evals(num_features) if max_evals is None else int(max_evals)
    if evals >= 2 * num_features + 1:
        evals -= evals % (2 * num_features + 1)   # whole permutations, as explain_image does
    # Unknown patient ids fail before the model is restored.
    cases = _find_patients(dataset, config.data, patients, splits) if patients else []

    trained = inference.load_trained(workdir, which=which, data_dir=data_dir)
    class_names = inference.class_names(trained.config)
    size = inference.eval_batch_size(trained.config) if batch_size is None else int(batch_size)
    size = -(-size // jax.device_count()) * jax.device_count()
    predict = step_lib.make_predict(trained.graphdef)
    if not patients:
        named = pipeline.named_splits(dataset, config.data,
                                      splits if splits else _default_split_names(config))
        pool, probs = [], []
        for name, split in named.items():
            p, _ = inference.predict_split(predict, trained.state, dataset, split, trained.mesh, size)
            probs.append(p)
            pool += [_Case(pid, center, name, split.tfds_splits[int(s)], int(pos), int(y))
                     for pid, center, (s, pos), y in zip(split.patient_ids, split.centers,
                                                         split.keys, split.labels, strict=True)]
        cases = _top_confident(pool, np.concatenate(probs), len(class_names), int(per_class))

    predict_proba = _model_predict_proba(trained, predict, size)
    sources = {}
    summaries = []
    writer = jax.process_index() == 0
    for case in tqdm(cases, desc="image SHAP", unit="case", disable=not progress):
        if case.tfds_split not in sources:
            sources[case.tfds_split] = tfds_builder.data_source(dataset.path, case.tfds_split)
        example = sources[case.tfds_split][case.position]
        crop = Crop(image=np.asarray(example["image"]), mask=np.asarray(example["mask"]),
                    box=np.asarray(example["box"]), crop_affine=np.asarray(example["crop_affine"]),
                    source_shape=np.asarray(example["source_shape"]),
                    source_affine=np.asarray(example["source_affine"]))
        explanation = explain_image(predict_proba, crop.image, grid=grid, baseline=baseline,
                                    max_evals=evals, seed=seed, batch_size=size,
                                    progress=progress, desc=case.patient_id)
        predicted = int(np.argmax(explanation.probs))
        explained = case.label if case.label >= 0 else predicted
        label = class_names[case.label] if case.label >= 0 else None
        title = (f"{case.patient_id} ({case.center}): true {label or 'unknown'}; SHAP for "
                 f"{class_names[explained]}, p = {explanation.probs[explained]:.3f} "
                 f"(baseline {baseline}: {explanation.base_values[explained]:.3f})")
        density = crop_density(explanation.values[explained], explanation.edges).sum(axis=-1)
        if writer:
            write_case(out_dir, case.patient_id, crop, explanation, explained, title)
        files = {k: str(p.relative_to(out_dir.parent))
                 for k, p in case_paths(out_dir, case.patient_id).items()}
        summaries.append({
            "patient_id": case.patient_id, "center": case.center, "split": case.split,
            "label": label, "predicted_class": class_names[predicted],
            "explained_class": class_names[explained],
            "probability": float(explanation.probs[explained]),
            "base_value": float(explanation.base_values[explained]),
            "attribution_sum": float(explanation.values[explained].sum()),
            "fraction_in_tumour": fraction_in_mask(density, crop.mask),
            "files": files})
    return {"method": METHOD, "baseline": baseline, "grid": list(grid), "max_evals": evals,
            "seed": int(seed), "checkpoint": which, "step": trained.step,
            "class_names": list(class_names), "cases": summaries}
