"""Quality-control montage: the central slices of every crop with the tumour mask outline.

One tile per case: axial, coronal and sagittal central slices of the first channel (the
crop is in RAS order, so they are the same anatomical views for every source orientation),
the mask outline in red, and the patient id above. A glance shows crops that missed the
tumour, masks that do not match the image, or a centre whose orientation went wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

_LABEL_HEIGHT = 12
_PAD = 4
_MIN_PANEL = 64   # small crops are enlarged (nearest) so ids and outlines stay legible


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """Central axial, coronal and sagittal slices of a RAS-ordered [D, H, W] volume,
    rotated so that anterior / superior point up."""
    x, y, z = (s // 2 for s in volume.shape)
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def _tile(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[h, 3w, 3] uint8 RGB: three views side by side with the mask outline in red."""
    scale = max(1, math.ceil(_MIN_PANEL / max(image.shape[:3])))
    panels = []
    for view, view_mask in zip(_views(image[..., 0].astype(np.float32)), _views(mask > 0),
                               strict=True):
        lo, hi = np.percentile(view, [1, 99]) if view.size else (0.0, 1.0)
        grey = np.clip((view - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
        outline = view_mask & ~ndimage.binary_erosion(view_mask)
        rgb[outline] = (255, 40, 40)
        panels.append(np.kron(rgb, np.ones((scale, scale, 1), np.uint8)))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 1), (0, 0))) for p in panels]
    return np.concatenate(panels, axis=1)


def write_montage(path: Path, cases: Sequence[tuple[str, str, str]]) -> None:
    """Writes the montage PNG.

    Args:
      path: the PNG to write.
      cases: (patient_id, center, npz path holding ``image`` [D, H, W, C] and ``mask``
        [D, H, W]) per case, in display order.
    """
    tiles = []
    for patient_id, center, npz in cases:
        with np.load(npz) as arrays:
            tiles.append((f"{patient_id} ({center})", _tile(arrays["image"], arrays["mask"])))
    if not tiles:
        Image.new("RGB", (320, 40), "black").save(path)
        return
    th = max(t.shape[0] for _, t in tiles) + _LABEL_HEIGHT + _PAD
    tw = max(t.shape[1] for _, t in tiles) + _PAD
    columns = max(1, min(len(tiles), round(math.sqrt(len(tiles) * th / tw))))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * tw, rows * th), "black")
    draw = ImageDraw.Draw(canvas)
    for i, (label, tile) in enumerate(tiles):
        x, y = (i % columns) * tw, (i // columns) * th
        draw.text((x + 2, y), label, fill=(255, 255, 160))
        canvas.paste(Image.fromarray(tile), (x, y + _LABEL_HEIGHT))
    canvas.save(path)
