"""her2jax: HER2 expression (zero / low / positive) from breast DCE-MRI with JAX/Flax."""

from her2jax.errors import Her2jaxError

__all__ = ["Her2jaxError"]
__version__ = "0.1.0"
