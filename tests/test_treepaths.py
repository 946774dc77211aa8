"""One name for a pytree leaf, from a live nnx state, its pure dict and a plain key tuple."""

from __future__ import annotations

import jax
from flax import nnx

from her2jax import treepaths


def test_a_parameter_has_one_name_in_a_state_a_pure_dict_and_a_key_tuple():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    from_state = sorted(treepaths.dotted(p) for p, _ in jax.tree_util.tree_leaves_with_path(state))
    pure = nnx.to_pure_dict(state)
    from_pure = sorted(treepaths.dotted(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure))
    assert from_state == from_pure == ["layers.0.bias", "layers.0.kernel", "layers.1.bias",
                                       "layers.1.kernel"]
    assert treepaths.keys(("layers", 0, "kernel")) == ("layers", 0, "kernel")
    assert treepaths.dotted(("blocks", 3, "attn", "qkv", "kernel")) == "blocks.3.attn.qkv.kernel"
    # A checkpoint's metadata names the array under a 'value' dict key: the same name again.
    as_dict = {"layers": {0: {"kernel": {"value": 1}}}}
    assert [treepaths.dotted(p) for p, _ in jax.tree_util.tree_leaves_with_path(as_dict)] == [
        "layers.0.kernel"]
