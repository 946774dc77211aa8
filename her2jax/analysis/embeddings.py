"""2-D embeddings (t-SNE, UMAP) of encoder features and how well classes and centres cluster.

Input is one or more ``features/<split>.npz`` files as ``train.inference.extract_features`` writes
them (``features`` [N, F], ``probs`` [N, K], ``labels`` [N] int (-1 unknown), ``patient_ids``,
``centers``, ``class_names``). ``analyze_embeddings`` writes ``{tsne,umap}_{class,center}.png``
and returns a summary dict for ``analysis/summary.json``.

Recipe (the same for both methods): standardise every feature (z-score), reduce to 50 principal
components when there are more than 50 features (the usual t-SNE preprocessing; it also makes
UMAP's neighbour search cheap), then t-SNE (``perplexity = min(30, (N - 1) / 3)``, PCA
initialisation) or UMAP (``n_neighbors = min(15, N - 1)``). Both are deterministic for a seed;
UMAP with a ``random_state`` runs single-threaded, which is fine at cohort sizes.

Silhouettes are computed on the standardised features (not on the 2-D maps, whose distances
t-SNE distorts): ``by_class`` over the labelled rows, ``by_center`` over all rows. Each is None
when it is undefined: fewer than two groups, or a group with fewer than two members.

Domain-shift rule: ``domain_shift_warning`` is True when the features cluster by acquisition
centre more than by HER2 class, i.e. ``by_center > 0.25`` and ``by_center > by_class`` (or
``by_class`` is None: with no usable labels, centre clusters alone are worth flagging).
0.25 is the conventional floor of "weak but real" structure for silhouette scores (Kaufman and
Rousseeuw); below it centre clusters are not worth a warning.

Tiny inputs: an embedding needs at least ``MIN_EMBED_ROWS`` (5) rows; ``embed`` raises
``Her2jaxError`` below that (t-SNE's perplexity and UMAP's spectral layout are meaningless on
a handful of points). ``analyze_embeddings`` then skips the plots, records why in
``embedding_skipped`` and still reports the silhouettes.

umap imports numba and compiles its kernels on the first ``fit_transform`` (~10 s per
process); they are cached in ``~/.cache/her2jax/numba`` (``numba_cache``), so only the first
run on a machine pays. umap is imported only inside ``embed``, so importing this module is
cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from her2jax.analysis import numba_cache
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files

METHODS = ("tsne", "umap")
MIN_EMBED_ROWS = 5
PCA_COMPONENTS = 50
DOMAIN_SHIFT_SILHOUETTE = 0.25
_REQUIRED_KEYS = ("features", "labels", "patient_ids", "centers", "class_names")
_UNKNOWN_COLOR = "#b0b0b0"


def load_features(paths: Sequence[Path]) -> dict:
    """Reads and concatenates ``features/<split>.npz`` files.

    Args:
      paths: one or more npz files in ``extract_features``' format; the split name of each is
        its file stem (``features/test.npz`` -> ``test``).

    Returns:
      ``{"features": [N, F] float32, "labels": [N] int64 (-1 unknown), "centers": [N] str,
      "patient_ids": [N] str, "split": [N] str, "class_names": tuple[str, ...]}``.

    Raises:
      Her2jaxError: no paths, a missing or unreadable file, a missing key, or files whose
        feature width or class names disagree.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise Her2jaxError("no features/<split>.npz files given; run --mode=features first")
    parts, class_names, width = [], None, None
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as e:
            raise Her2jaxError(f"cannot read features file ({e})", file=path) from e
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise Her2jaxError(f"features file lacks {', '.join(missing)}; rewrite it with "
                               "--mode=features", file=path)
        features = np.asarray(data["features"], np.float32)
        n = features.shape[0] if features.ndim == 2 else -1
        if n < 0 or any(len(data[k]) != n for k in ("labels", "patient_ids", "centers")):
            raise Her2jaxError(f"features must be [N, F] with N labels, patient_ids and "
                               f"centers; got features {features.shape}", file=path)
        names = tuple(str(c) for c in data["class_names"])
        if class_names is not None and names != class_names:
            raise Her2jaxError(f"class_names {list(names)} differ from {list(class_names)} in "
                               f"{paths[0]}; were the splits made by one run?", file=path)
        if width is not None and features.shape[1] != width:
            raise Her2jaxError(f"{features.shape[1]} features per case, {paths[0]} has "
                               f"{width}; were the splits made by one model?", file=path)
        class_names, width = names, features.shape[1]
        parts.append(dict(features=features,
                          labels=np.asarray(data["labels"], np.int64),
                          centers=np.asarray(data["centers"]).astype(str),
                          patient_ids=np.asarray(data["patient_ids"]).astype(str),
                          split=np.full(n, path.stem)))
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["class_names"] = class_names
    return out


def _standardize(features: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise Her2jaxError(f"features must be [N, F]; got shape {features.shape}")
    if not np.isfinite(features).all():
        raise Her2jaxError("features contain NaN or infinite values; check the checkpoint "
                           "that extracted them")
    return StandardScaler().fit_transform(features)


def _import_umap():
    """Imports umap with its numba kernels cached on disk (compiling them costs ~10 s)."""
    return numba_cache.import_cached("umap")


def embed(features: np.ndarray, *, method: str, seed: int = 0) -> np.ndarray:
    """Embeds features in 2-D with t-SNE or UMAP (see the module docstring for the recipe).

    Args:
      features: [N, F] float, N >= MIN_EMBED_ROWS.
      method: "tsne" or "umap".
      seed: random state; the same features and seed give the same coordinates.

    Returns:
      [N, 2] float32 coordinates.

    Raises:
      Her2jaxError: an unknown method, fewer than MIN_EMBED_ROWS rows, or non-finite features.
    """
    if method not in METHODS:
        raise Her2jaxError(f"unknown embedding method {method!r}; use one of {METHODS}")
    x = _standardize(features)
    n = x.shape[0]
    if n < MIN_EMBED_ROWS:
        raise Her2jaxError(f"{n} cases are too few for a {method} embedding (need at least "
                           f"{MIN_EMBED_ROWS})")
    if x.shape[1] > PCA_COMPONENTS:
        from sklearn.decomposition import PCA

        x = PCA(n_components=min(PCA_COMPONENTS, n), random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        model = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                     random_state=seed)
    else:
        model = _import_umap().UMAP(n_components=2, n_neighbors=min(15, n - 1),
                                    random_state=seed, n_jobs=1)
    return np.asarray(model.fit_transform(x), np.float32)


def _silhouette(x: np.ndarray, groups: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    _, counts = np.unique(groups, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        return None
    return float(silhouette_score(x, groups))


def silhouettes(features: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> dict:
    """Silhouette scores of the standardised features grouped by class and by centre.

    Args:
      features: [N, F] float.
      labels: [N] int class indices, -1 for unknown (left out of ``by_class``).
      centers: [N] centre names.

    Returns:
      ``{"by_class": float | None, "by_center": float | None}``; None when fewer than two
      groups or a group with fewer than two members.
    """
    labels = np.asarray(labels)
    centers = np.asarray(centers).astype(str)
    if len(labels) != len(features) or len(centers) != len(features):
        raise Her2jaxError(f"{len(features)} feature rows but {len(labels)} labels and "
                           f"{len(centers)} centres")
    if len(features) == 0:
        return {"by_class": None, "by_center": None}
    x = _standardize(features)
    known = labels >= 0
    return {"by_class": _silhouette(x[known], labels[known]),
            "by_center": _silhouette(x, centers)}


def domain_shift(silhouette: dict) -> bool:
    """The module docstring's rule: centres cluster (> 0.25) and more than classes do."""
    by_center, by_class = silhouette["by_center"], silhouette["by_class"]
    if by_center is None or by_center <= DOMAIN_SHIFT_SILHOUETTE:
        return False
    return by_class is None or by_center > by_class


def plot_embedding(path, coords: np.ndarray, groups: np.ndarray, *, title: str,
                   group_names: dict | Sequence[str] | None = None) -> None:
    """Writes a PNG scatter plot of 2-D coordinates coloured by group, with a legend.

    Args:
      path: the PNG to write (its folder is created).
      coords: [N, 2] float.
      groups: [N] group keys (class indices or centre names); the integer -1 is drawn grey
        as "unknown".
      title: the plot title.
      group_names: legend names: a mapping from group key, or a sequence indexed by an
        integer group; groups not named show their key.
    """
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    groups = np.asarray(groups)
    if group_names is None:
        names = {}
    elif isinstance(group_names, dict):
        names = dict(group_names)
    else:
        names = dict(enumerate(group_names))
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = list(np.unique(groups))
    colors = iter(_palette(len(keys)))
    for key in keys:
        rows = groups == key
        unknown = np.issubdtype(groups.dtype, np.integer) and key == -1
        plain = key.item()  # numpy scalar -> int / str, to look up group_names
        label = "unknown" if unknown else str(names.get(plain, plain))
        ax.scatter(coords[rows, 0], coords[rows, 1], s=18, alpha=0.8,
                   color=_UNKNOWN_COLOR if unknown else next(colors),
                   label=f"{label} (n={int(rows.sum())})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    files.write_figure(path, fig)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def analyze_embeddings(features_paths: Sequence[Path], out_dir, *, seed: int = 0,
                       methods: Sequence[str] = METHODS) -> dict:
    """Embeds the features of the given splits, plots them by class and by centre.

    Args:
      features_paths: ``features/<split>.npz`` files (concatenated; see ``load_features``).
      out_dir: where ``<method>_class.png`` and ``<method>_center.png`` are written.
      seed: the embeddings' random state.
      methods: a subset of ("tsne", "umap").

    Returns:
      ``{"silhouette": {"by_class", "by_center"}, "domain_shift_warning": bool, "n": N,
      "files": [PNG names relative to out_dir], "embedding_skipped": None | reason}``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise Her2jaxError(f"unknown embedding method(s) {unknown}; use a subset of {METHODS}")
    data = load_features(features_paths)
    out_dir = Path(out_dir)
    silhouette = silhouettes(data["features"], data["labels"], data["centers"])
    n = len(data["labels"])
    files, skipped = [], None
    if n < MIN_EMBED_ROWS:
        skipped = f"{n} cases are too few for an embedding (need at least {MIN_EMBED_ROWS})"
        methods = ()
    for method in methods:
        coords = embed(data["features"], method=method, seed=seed)
        label = {"tsne": "t-SNE", "umap": "UMAP"}[method]
        for kind, groups, names in (("class", data["labels"], data["class_names"]),
                                    ("center", data["centers"], None)):
            name = f"{method}_{kind}.png"
            plot_embedding(out_dir / name, coords, groups, group_names=names,
                           title=f"{label} of encoder features by {kind} (n={n})")
            files.append(name)
    return {"silhouette": silhouette, "domain_shift_warning": domain_shift(silhouette),
            "n": n, "files": files, "embedding_skipped": skipped}
