"""One case's DCE-MRI phases + tumour mask -> one fixed-size multi-channel crop (nibabel + scipy).

Shared by ``her2jax-prepare`` (which stores the crops) and predict (which must see exactly what
training saw). The recipe fields are specified in :mod:`her2jax.data.recipes`; the steps are:

1. **Canonical orientation.** The arrays are read in RAS+ voxel order (output axis 0 runs
   left -> right, 1 posterior -> anterior, 2 inferior -> superior) using nibabel's
   ``io_orientation`` / ``ornt_transform`` / ``apply_orientation`` / ``inv_ornt_aff``: a
   transpose and flips of the voxel axes, never an interpolation. An oblique acquisition stays
   oblique; ``crop_affine`` carries the residual rotation.
2. **Tumour box.** The mask (any value > 0) is reduced to its largest 26-connected component
   (``largest_component``; ties go to the first component in source scan order) and its tight
   bounding box.
3. **Output grid.** ``spacing_mm == 0`` (FM-BCMRI): the box, grown by ``margin_mm`` on every
   side (converted to a possibly fractional number of voxels per axis with that axis's voxel
   size, so the margin is exact in millimetres), is resized to ``shape`` with the
   centre-aligned convention (``align_corners=False`` in PyTorch, ``grid_mode=True`` in scipy):
   the box's outer voxel *edges* map onto the output's outer edges, output voxel ``o`` samples
   box position ``(o + 0.5) * len_in / len_out - 0.5``. ``spacing_mm > 0``: a box of
   ``shape * spacing_mm`` mm centred on the tumour box's centre is sampled every
   ``spacing_mm`` along each canonical voxel axis. Either way only the source voxels the grid
   touches (plus the one-voxel linear-interpolation stencil) are read, reoriented and
   resampled: whole volumes are never resampled. Samples near the box edge interpolate with
   the image's real neighbouring voxels (FM-BCMRI crops first, then resizes with MONAI's
   ``Resize``, which sees only the box), so every output voxel is the image's trilinear value
   at its world position.
4. **Outside the image = 0.** Grid points outside the source image read zero intensity (no
   signal outside the field of view, MONAI's and TorchIO's default padding), with linear
   interpolation between the last image voxel and the zero outside. The box is *not* shrunk
   to the image, so the tumour stays centred and the physical scale stays the same. ``Crop.box``
   reports the clipped source region actually read. Non-finite source voxels also read 0.
5. **Channels** (computed on the source voxels of the crop, then resampled): ``C<k>`` phase k,
   ``SUB<k>`` = Ck - C0, ``PE`` = (C1 - C0) / max(|C0|, eps) clipped to ``PE_RANGE``,
   ``PE<k>`` the same at phase k, ``PEL`` at the last phase,
   ``SER`` = (C1 - C0) / max(Clast - C0, eps) clipped to ``SER_RANGE``, ``MASK`` the kept
   tumour component as 0 / 1 (resampled linearly: partial volume at its edge). ``eps`` is
   ``EPS_FRACTION`` of the image's global pre-contrast signal (SPM's "global": the mean of
   the C0 voxels above 1/8 of C0's mean, i.e. roughly the mean tissue intensity), so PE and SER
   are exact wherever the denominator is above 5 % of tissue signal and bounded in air and in
   non-enhancing tissue (where SER's denominator is noise).
6. **Normalisation** (after resampling): ``crop`` z-scores each channel over the crop,
   ``(x - mean) / (std + 1e-8)`` with PyTorch's unbiased std (FM-BCMRI's ``z_score`` runs on a
   torch tensor); ``joint`` z-scores ``C<k>`` channels with one mean / std over every voxel of
   every phase passed in (all of the case's phases, not only those the recipe uses) and derived
   channels over the crop; ``ratio`` z-scores ``C<k>`` and ``SUB<k>`` over the crop and keeps
   the dimensionless channels (``PE``, ``PE<k>``, ``PEL``, ``SER``, ``MASK``) as they are, so
   that a relative enhancement means the same on every scanner; ``none`` keeps raw values.
   ``MASK`` is never normalised. ``mask_only`` then zeroes the voxels outside the output mask.
7. **Output** float16, finite, clipped to float16's range (only reachable with ``none``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from her2jax.data import recipes
from her2jax.errors import Her2jaxError

# Bump whenever a change here changes what a recipe produces: it is part of the fingerprint,
# so prepared datasets are rebuilt rather than silently reused.
PREPROCESS_VERSION = 1

NORMALIZE_MODES = ("crop", "joint", "ratio", "none")
RECIPE_FIELDS = ("name", "channels", "shape", "margin_mm", "spacing_mm", "normalize",
                 "mask_only", "largest_component")
ZSCORE_EPS = 1e-8
EPS_FRACTION = 0.05          # PE / SER denominators floor, as a fraction of the C0 global signal
PE_RANGE = (-1.0, 10.0)      # -100 % (signal lost) .. +1000 % (vessels)
SER_RANGE = (0.0, 3.0)       # persistent < 1 ~ plateau < washout; > 3 is noise over a small denominator
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_CHUNK = 1 << 18             # voxels per chunk of the whole-image statistics (1 MiB of float32)
_TOKEN = re.compile(r"^(C|SUB|PE)(\d+)$")
_NAMED = ("PE", "PEL", "SER", "MASK")
_RATIOS = ("PE", "PEL", "SER", "MASK")   # dimensionless kinds: kept as they are by 'ratio'
_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass(frozen=True, eq=False)
class Crop:
    """One preprocessed case.

    Attributes:
      image: [D, H, W, C] float16, the network input (``recipe.shape`` x channels, RAS axes).
      mask: [D, H, W] uint8, the tumour mask (kept component) on the same grid (nearest).
      box: [3, 2] int32, ``[start, stop)`` of the source voxels read, per *source* axis
        (before reorientation), clipped to the image.
      crop_affine: [4, 4] float64, output voxel index (d, h, w) -> world mm of that voxel's
        centre, in the source affine's world space (maps results back onto the original image).
      source_shape: [3] int32.
      source_affine: [4, 4] float64.
    """

    image: np.ndarray
    mask: np.ndarray
    box: np.ndarray
    crop_affine: np.ndarray
    source_shape: np.ndarray
    source_affine: np.ndarray


# ----------------------------------------------------------------------------- recipe


def _get(recipe, key: str):
    try:
        return recipe[key]
    except (KeyError, TypeError) as err:
        raise Her2jaxError("missing from the preprocessing recipe", key=f"recipe.{key}") from err


def _channels(recipe) -> tuple[str, ...]:
    value = _get(recipe, "channels")
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, Sequence) or not all(isinstance(t, str) for t in value):
        raise Her2jaxError(f"channels must be a sequence of tokens, got {value!r}",
                           key="recipe.channels")
    tokens = tuple(t.strip().upper() for t in value)
    if not tokens:
        raise Her2jaxError("no channels", key="recipe.channels")
    return tokens


def _parse(token: str) -> tuple[str, int | None]:
    """'C2' -> ('C', 2), 'SUB1' -> ('SUB', 1), 'PE3' -> ('PE', 3), 'PE' -> ('PE', 1),
    'PEL' / 'SER' / 'MASK' -> (token, None); unknown -> Her2jaxError."""
    if token == "PE":
        return "PE", 1
    if token in _NAMED:
        return token, None
    match = _TOKEN.match(token)
    if match is None:
        raise Her2jaxError(f"unknown channel token {token!r}; expected C<k>, SUB<k>, PE<k> "
                           "(k >= 1), PE, PEL, SER or MASK", key="recipe.channels")
    kind, k = match.group(1), int(match.group(2))
    if kind in ("SUB", "PE") and k == 0:
        raise Her2jaxError(f"{kind}0 compares C0 with itself, always zero; use {kind}<k> with "
                           "k >= 1", key="recipe.channels")
    return kind, k


def _phases_of(token: str, num_phases: int) -> tuple[int, ...]:
    """Source phase indices a channel reads (``num_phases`` resolves SER's last phase)."""
    kind, k = _parse(token)
    if kind == "C":
        return (k,)
    if kind in ("SUB", "PE"):
        return (0, k)
    if kind == "PEL":
        return (0, num_phases - 1)
    if kind == "MASK":
        return ()
    return (0, 1, num_phases - 1)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_recipe(recipe, num_phases: int | None = None) -> None:
    """Raises Her2jaxError naming the recipe key when the recipe cannot be applied.

    Args:
      recipe: ConfigDict from ``recipes.recipe_config`` or a plain dict with its fields.
      num_phases: the case's number of phases, to check that every channel's phases exist.
    """
    for key in RECIPE_FIELDS:
        _get(recipe, key)
    name = _get(recipe, "name")
    if name not in recipes.RECIPES:
        raise Her2jaxError(f"unknown recipe {name!r}; expected one of "
                           f"{', '.join(recipes.RECIPES)} (override its fields, keep its name)",
                           key="recipe.name")
    tokens = _channels(recipe)
    for token in tokens:
        kind, k = _parse(token)
        if num_phases is None:
            continue
        if k is not None and k >= num_phases:
            raise Her2jaxError(f"channel {token} needs phase {k} but the case has {num_phases} "
                               f"phase(s) (0..{num_phases - 1})", key="recipe.channels")
        need = {"PEL": 2, "SER": 3}.get(kind, 0)
        if num_phases < need:
            raise Her2jaxError(f"channel {token} needs at least {need} phases (C0"
                               f"{', C1' if need == 3 else ''} and a later one) but the case has "
                               f"{num_phases}", key="recipe.channels")
    shape = _get(recipe, "shape")
    if (not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) != 3
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0
                       for n in shape)):
        raise Her2jaxError(f"shape must be 3 positive integers (D, H, W), got {shape!r}",
                           key="recipe.shape")
    for key in ("margin_mm", "spacing_mm"):
        value = _get(recipe, key)
        if not _is_real(value) or value < 0:
            raise Her2jaxError(f"must be a finite number >= 0, got {value!r}", key=f"recipe.{key}")
    normalize = _get(recipe, "normalize")
    if not isinstance(normalize, str) or normalize.strip().lower() not in NORMALIZE_MODES:
        raise Her2jaxError(f"unknown normalize mode {normalize!r}; expected one of "
                           f"{', '.join(NORMALIZE_MODES)}", key="recipe.normalize")
    for key in ("mask_only", "largest_component"):
        if not isinstance(_get(recipe, key), bool | np.bool_):
            raise Her2jaxError(f"must be True or False, got {_get(recipe, key)!r}",
                               key=f"recipe.{key}")


def required_phases(recipe) -> int:
    """How many phases a case needs for this recipe (C2 -> 3; SUB1 -> 2; PE -> 2; PEL -> 2;
    SER -> 3; MASK -> 1)."""
    need = 1
    for token in _channels(recipe):
        kind, k = _parse(token)
        need = max(need, k + 1 if k is not None else {"PEL": 2, "SER": 3, "MASK": 1}[kind])
    return need


def recipe_fingerprint(recipe) -> str:
    """A stable 12-hex-digit hash of the recipe's fields and ``PREPROCESS_VERSION``.

    Equivalent spellings hash alike (tuple or list, 5 or 5.0, ``c2`` or ``C2``); any change of a
    field's value, including ``name``, changes the hash.
    """
    fields = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
    norm = {}
    for key, value in fields.items():
        try:
            if key == "channels":
                value = list(_channels(fields))
            elif key == "shape":
                value = [int(n) for n in value]
            elif key in ("margin_mm", "spacing_mm"):
                value = float(value)
            elif key in ("mask_only", "largest_component"):
                value = bool(value)
            elif key == "normalize":
                value = str(value).strip().lower()
        except (TypeError, ValueError, Her2jaxError):
            pass  # an invalid value still hashes (as written); check_recipe reports it
        norm[key] = value
    payload = json.dumps({"preprocess_version": PREPROCESS_VERSION, "recipe": norm},
                         sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- geometry


def _to_canonical(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ornt source->RAS, canonical affine, canonical shape) for a source affine and shape."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), _RAS)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    canon_shape = np.empty(3, np.int64)
    canon_shape[ornt[:, 0].astype(int)] = shape
    return ornt, canon_affine, canon_shape


def _source_to_canonical_box(ornt, shape, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) per source axis -> [lo, hi) per canonical (RAS) axis."""
    lo, hi = np.empty(3, np.int64), np.empty(3, np.int64)
    for i in range(3):
        k, flip = int(ornt[i, 0]), ornt[i, 1] < 0
        lo[k], hi[k] = (shape[i] - stop[i], shape[i] - start[i]) if flip else (start[i], stop[i])
    return lo, hi


def _canonical_to_source_box(ornt, shape, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) per canonical (RAS) axis -> [start, stop) per source axis."""
    start, stop = np.empty(3, np.int64), np.empty(3, np.int64)
    for i in range(3):
        k, flip = int(ornt[i, 0]), ornt[i, 1] < 0
        start[i], stop[i] = (shape[i] - hi[k], shape[i] - lo[k]) if flip else (lo[k], hi[k])
    return start, stop


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight [start, stop) per axis of a non-empty boolean array."""
    xy = np.any(mask, axis=2)
    axes = (np.any(xy, axis=1), np.any(xy, axis=0), np.any(mask, axis=(0, 1)))
    start = np.array([np.argmax(a) for a in axes])
    stop = np.array([len(a) - np.argmax(a[::-1]) for a in axes])
    return start, stop


def _tumour(mask: np.ndarray, largest_component: bool):
    """(start, stop, kept mask inside [start, stop)) in source voxel indices."""
    start, stop = _bounds(mask)
    sub = mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    if largest_component:
        labels, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            sub = labels == np.argmax(counts)  # argmax: ties -> first label in scan order
            s2, e2 = _bounds(sub)
            sub = sub[tuple(slice(a, b) for a, b in zip(s2, e2, strict=True))]
            start, stop = start + s2, start + e2
    return start, stop, sub


def _grid(lo, hi, zooms, shape, margin_mm: float, spacing_mm: float):
    """Output grid in canonical voxel coordinates: position(o) = origin + o * step per axis."""
    n = np.asarray(shape, np.float64)
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    if spacing_mm > 0:
        step = spacing_mm / zooms
        origin = (lo + hi - 1) / 2 - (n - 1) / 2 * step
    else:
        margin = margin_mm / zooms
        step = (hi - lo + 2 * margin) / n
        origin = lo - 0.5 - margin + 0.5 * step
    return origin, step


# ----------------------------------------------------------------------------- intensities


def _phase_count(phases) -> int:
    return phases.shape[0] if isinstance(phases, np.ndarray) else len(phases)


def _global_stats(phases) -> tuple[float, float]:
    """Mean and unbiased std over every voxel of every phase (non-finite voxels count as 0).

    One pass in cache-sized chunks, merged with Chan et al.'s pairwise update: no
    volume-sized temporaries (their page faults cost more than the arithmetic).
    """
    count, mean, sum_sq = 0, 0.0, 0.0
    buffer = np.empty(_CHUNK, np.float32)
    for p in range(_phase_count(phases)):
        flat = np.asarray(phases[p]).ravel(order="K")
        for i in range(0, flat.size, _CHUNK):
            chunk = flat[i:i + _CHUNK]
            n = chunk.size
            chunk_mean = float(chunk.sum(dtype=np.float64)) / n
            if not math.isfinite(chunk_mean):
                chunk = np.where(np.isfinite(chunk), chunk, 0).astype(np.float32)
                chunk_mean = float(chunk.sum(dtype=np.float64)) / n
            centred = np.subtract(chunk, np.float32(chunk_mean), out=buffer[:n], dtype=np.float32)
            chunk_sq = float(np.dot(centred, centred))
            delta = chunk_mean - mean
            total = count + n
            mean += delta * n / total
            sum_sq += chunk_sq + delta * delta * count * n / total
            count = total
    return mean, math.sqrt(sum_sq / max(count - 1, 1))


def _global_signal(volume) -> float:
    """SPM's global signal: the mean of the voxels above 1/8 of the volume's mean (roughly the
    mean tissue intensity, whatever the share of air in the field of view); non-finite voxels
    are ignored."""
    flat = np.asarray(volume).ravel(order="K")
    flat = flat[np.isfinite(flat)] if not np.isfinite(flat.mean(dtype=np.float64)) else flat
    mean = flat.mean(dtype=np.float64) if flat.size else 0.0
    bright = flat[flat > mean / 8]
    return float(bright.mean(dtype=np.float64)) if bright.size and mean > 0 else 0.0


def _channel(token: str, block: dict[int, np.ndarray], last: int, eps: float,
             mask: np.ndarray) -> np.ndarray:
    kind, k = _parse(token)
    if kind == "C":
        return block[k]
    if kind == "SUB":
        return block[k] - block[0]
    if kind == "MASK":
        return mask.astype(np.float32)
    if kind in ("PE", "PEL"):
        k = last if kind == "PEL" else k
        return np.clip((block[k] - block[0]) / np.maximum(np.abs(block[0]), eps), *PE_RANGE)
    wash_in = block[1] - block[0]
    return np.clip(wash_in / np.maximum(block[last] - block[0], eps), *SER_RANGE)


def _zscore(x: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
    if mean is None:
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64, ddof=1))
    return ((x - mean) / (std + ZSCORE_EPS)).astype(np.float32)


# ----------------------------------------------------------------------------- preprocess


def _check_inputs(phases, mask, affine) -> tuple[tuple[int, int, int], np.ndarray]:
    num = _phase_count(phases)
    if num < 1:
        raise Her2jaxError("no image phases")
    shapes = {tuple(np.shape(phases[p])) for p in range(num)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise Her2jaxError(f"phases must be 3D volumes of one shape, got shapes {sorted(shapes)}")
    shape = next(iter(shapes))
    if tuple(np.shape(mask)) != shape:
        raise Her2jaxError(f"mask shape {tuple(np.shape(mask))} differs from the image shape "
                           f"{shape}")
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() \
            or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Her2jaxError("image affine is not a finite, invertible 4x4 matrix")
    return shape, affine


def preprocess(phases, mask, affine, recipe) -> Crop:
    """Crops, reorients, resamples, derives channels and normalises one case.

    Args:
      phases: [P, X, Y, Z] float (or a sequence of P [X, Y, Z] volumes) in the source voxel
        grid, phase 0 pre-contrast.
      mask: [X, Y, Z] tumour mask (any value > 0 is tumour) on the same grid.
      affine: [4, 4] source voxel index -> world mm (the NIfTI affine).
      recipe: ConfigDict from ``recipes.recipe_config`` or a dict with the same fields.

    Returns:
      The Crop (image [D, H, W, C] float16 with D, H, W = ``recipe.shape``).

    Raises:
      Her2jaxError: bad recipe, too few phases, mismatched shapes, bad affine, empty mask.
    """
    shape, affine = _check_inputs(phases, mask, affine)
    num_phases = _phase_count(phases)
    check_recipe(recipe, num_phases)
    tokens = _channels(recipe)
    out_shape = tuple(int(n) for n in recipe["shape"])
    normalize = str(recipe["normalize"]).strip().lower()

    mask = np.asarray(mask)
    mask = mask if mask.dtype == bool else mask > 0
    if not mask.any():
        raise Her2jaxError("tumour mask is empty")
    src_start, src_stop, kept = _tumour(mask, bool(recipe["largest_component"]))

    # Everything below works in canonical (RAS+) voxel coordinates on the few voxels needed.
    ornt, canon_affine, canon_shape = _to_canonical(affine, shape)
    lo, hi = _source_to_canonical_box(ornt, shape, src_start, src_stop)
    zooms = np.linalg.norm(canon_affine[:3, :3], axis=0)
    origin, step = _grid(lo, hi, zooms, out_shape, float(recipe["margin_mm"]),
                         float(recipe["spacing_mm"]))
    first = np.floor(origin).astype(np.int64)
    stop = np.floor(origin + (np.array(out_shape) - 1) * step).astype(np.int64) + 2
    read_lo, read_hi = np.clip(first, 0, canon_shape), np.clip(stop, 0, canon_shape)
    read_start, read_stop = _canonical_to_source_box(ornt, shape, read_lo, read_hi)
    src_slices = tuple(slice(int(a), int(b)) for a, b in zip(read_start, read_stop, strict=True))
    # Where the read region sits inside the zero-padded block [first, stop).
    put = tuple(slice(int(a), int(b)) for a, b in zip(read_lo - first, read_hi - first, strict=True))
    block_shape = tuple(int(n) for n in stop - first)

    needed = sorted({p for t in tokens for p in _phases_of(t, num_phases)})
    block = {}
    for p in needed:
        padded = np.zeros(block_shape, np.float32)
        padded[put] = nib.orientations.apply_orientation(
            np.asarray(phases[p][src_slices], np.float32), ornt)
        block[p] = np.nan_to_num(padded, copy=False, nan=0.0, posinf=0.0, neginf=0.0)

    # The kept component lives in [lo, hi); a small spacing_mm box may cut it: place the overlap.
    mask_block = np.zeros(block_shape, np.uint8)
    kept = nib.orientations.apply_orientation(kept, ornt)
    a, b = np.maximum(lo, first), np.minimum(hi, stop)
    if np.all(b > a):
        mask_block[tuple(slice(int(x), int(y)) for x, y in zip(a - first, b - first, strict=True))] \
            = kept[tuple(slice(int(x), int(y)) for x, y in zip(a - lo, b - lo, strict=True))]

    eps = 1.0
    if any(_parse(t)[0] in ("PE", "PEL", "SER") for t in tokens):
        eps = max(EPS_FRACTION * _global_signal(phases[0]), float(np.finfo(np.float32).tiny))

    def resample(volume: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(volume, step, offset=origin - first,
                                        output_shape=out_shape, order=order, mode="nearest",
                                        prefilter=False)

    out_mask = resample(mask_block, 0).astype(np.uint8)
    joint = _global_stats(phases) if normalize == "joint" else None
    channels = []
    for token in tokens:
        kind = _parse(token)[0]
        with np.errstate(over="ignore", invalid="ignore"):
            raw = _channel(token, block, num_phases - 1, eps, mask_block).astype(np.float32)
        if not np.isfinite(raw).all():
            # Finite phases whose difference or ratio leaves float32 (intensities near
            # +-3e38): the same channel in float64, normalised before it is narrowed.
            raw = _channel(token, {p: v.astype(np.float64) for p, v in block.items()},
                           num_phases - 1, eps, mask_block)
        x = resample(raw, 1)
        if kind == "MASK" or (normalize == "ratio" and kind in _RATIOS):
            pass
        elif normalize in ("crop", "ratio") or (normalize == "joint" and kind != "C"):
            x = _zscore(x)
        elif normalize == "joint":
            x = _zscore(x, *joint)
        if recipe["mask_only"]:
            x = np.where(out_mask > 0, x, 0)
        channels.append(np.clip(x, -_FLOAT16_MAX, _FLOAT16_MAX))
    image = np.stack(channels, axis=-1).astype(np.float16)
    if not np.isfinite(image).all():  # a bug, not a user error: the steps above are finite
        raise AssertionError("preprocess produced non-finite values")

    to_canonical_index = np.eye(4)
    to_canonical_index[:3, :3] = np.diag(step)
    to_canonical_index[:3, 3] = origin
    return Crop(
        image=image,
        mask=out_mask,
        box=np.stack([read_start, read_stop], axis=1).astype(np.int32),
        crop_affine=canon_affine @ to_canonical_index,
        source_shape=np.array(shape, np.int32),
        source_affine=affine,
    )
