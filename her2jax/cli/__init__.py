"""Console scripts. Each is a thin absl app; :func:`run` gives them one error contract.

User errors (a ``Her2jaxError``, a bad flag, a bad ``--config.x.y`` override) print one line
``<prog>: error: <what and why>`` on stderr and exit 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags, logging

from her2jax.errors import Her2jaxError

EXIT_USER_ERROR = 2


def fail(prog: str, message: object) -> None:
    """Prints one line naming the program and the problem, and exits 2."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _flags_parser(prog: str) -> Callable[[Sequence[str]], list[str]]:
    def parse(argv: Sequence[str]) -> list[str]:
        try:
            return flags.FLAGS(list(argv))
        except flags.Error as e:
            fail(prog, e)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            # ml_collections raises these for an override of a missing key or a wrong type.
            fail(prog, f"bad flag or config override: {e}")
        except Her2jaxError as e:
            fail(prog, e)
        raise AssertionError("unreachable")

    return parse


def run(main: Callable[[list[str]], int | None], *, positional: int = 0) -> None:
    """Runs ``main`` as an absl app with her2jax's exit-code contract (2 = user error).

    Args:
      main: receives argv (program name, then up to ``positional`` arguments).
      positional: how many non-flag arguments the program takes; more is a user error.
    """
    prog = Path(sys.argv[0]).name

    def wrapped(argv: list[str]) -> int | None:
        if len(argv) > 1 + positional:
            extra = argv[1 + positional:]
            fail(prog, f"unexpected arguments {' '.join(extra)!r} (flags are --name=value)")
        if not flags.FLAGS["verbosity"].present:
            # Libraries (TFDS, JAX, orbax) log chattily at INFO; ask with --verbosity=0.
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except Her2jaxError as e:
            fail(prog, e)
        return None

    app.run(wrapped, flags_parser=_flags_parser(prog))
