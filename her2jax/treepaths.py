"""Names of pytree leaves: one helper for jax key paths (``tree_flatten_with_path``) and the
plain key tuples of nested dicts, used by the optimizer's parameter groups, the checkpoint
layout checks and the weight ports alike."""

from __future__ import annotations

import jax


def keys(path) -> tuple:
    """A path as plain keys: ``('encoder', 'blocks', 0, 'attn', 'qkv', 'kernel')``.

    Accepts a jax key path (``DictKey`` / ``SequenceKey`` / ``GetAttrKey`` entries, or any
    entry with a ``key`` / ``name`` / ``idx``) or a tuple of plain keys. The ``value`` an
    ``nnx.Variable`` node flattens through is dropped, so a parameter has the same name in a
    model state, in its pure dict and in a checkpoint's metadata.
    """
    out = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            out.append(entry.key)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            out.append(entry.idx)
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            out.append(entry.name)
        else:
            out.append(next((getattr(entry, a) for a in ("key", "name", "idx")
                             if hasattr(entry, a)), entry))
    # A Variable's array sits under 'value': an attribute in a live state, a dict key in the
    # tree orbax reads back from a checkpoint's metadata. Both sides name it alike.
    if out and out[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey
                                                 | jax.tree_util.DictKey):
        out.pop()
    return tuple(out)


def dotted(path) -> str:
    """A path as one dotted name: ``encoder.blocks.0.attn.qkv.kernel``."""
    return ".".join(str(k) for k in keys(path))
