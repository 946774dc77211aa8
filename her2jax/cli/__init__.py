"""Console scripts. Each is a thin absl app; :func:`run` gives them one error contract.

User errors (a ``Her2jaxError``, a bad flag, a bad ``--config.x.y`` override) print one line
``<prog>: error: <what and why>`` on stderr and exit 2. Anything else is a bug and keeps
its traceback.

Every script also tightens the umask to at least :data:`UMASK` before it writes anything:
outputs hold patient data, so what a run creates is readable by its owner and group only
(a stricter umask the user set is kept).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags, logging

from her2jax.errors import Her2jaxError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130   # the shell's convention for a program stopped by SIGINT
UMASK = 0o027   # no permission for "other"; no write for the group


def fail(prog: str, message: object) -> None:
    """Prints one line naming the program and the problem, and exits 2."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def config_file_error(error: BaseException) -> str | None:
    """One line for ml_collections' failure to load a ``--config`` file (missing, a syntax
    error, an exception in ``get_config``), or None for any other error."""
    if isinstance(error, SyntaxError) and error.filename:
        return (f"config file {error.filename}, line {error.lineno}: {error.msg} "
                f"({(error.text or '').strip()!r})")
    text = str(error)
    missing = re.search(r"Attempted \[[^]]*\]:\s+(\S+)\s+\[Errno \d+\] ([^:\n]+)", text)
    if "Failed loading config file" in text and missing:
        return f"config file {missing.group(1)}: {missing.group(2)}"
    if "Error whilst parsing config file" in text:
        head = text.split("Error whilst parsing config file")[0].rstrip(": ")
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        last = last.rsplit("^", 1)[-1].strip()
        return f"{head}: the config file failed to load: {last}"
    return None


# A full disk, a quota, a read-only filesystem: the user's storage, not a bug.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def storage_error(error: OSError) -> str | None:
    """One line for a write that the storage refused (the writers have already removed their
    temporary files and the folders they created), or None for any other OSError."""
    if error.errno not in _STORAGE_ERRNOS:
        return None
    where = f" {error.filename}" if error.filename else ""
    return (f"cannot write{where}: {error.strerror or os.strerror(error.errno)}; nothing "
            "half-written was kept, free space and run the same command again")


def _flags_parser(prog: str) -> Callable[[Sequence[str]], list[str]]:
    def parse(argv: Sequence[str]) -> list[str]:
        try:
            return flags.FLAGS(list(argv))
        except SyntaxError as e:
            fail(prog, config_file_error(e) or e)
        except flags.Error as e:
            fail(prog, config_file_error(e) or e)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            # ml_collections raises these for an override of a missing key (a KeyError, or an
            # AttributeError raised while handling one) or of a wrong type.
            missing = e if isinstance(e, KeyError) else e.__context__
            if isinstance(missing, KeyError):
                fail(prog, _missing_key(argv, missing))
            fail(prog, f"bad flag or config override: {e}")
        except Her2jaxError as e:
            fail(prog, e)
        raise AssertionError("unreachable")

    return parse


def _missing_key(argv: Sequence[str], error: KeyError) -> str:
    """The one-line message for ml_collections' KeyError: the override and the missing key."""
    key = str(error.args[0]).strip("'\"") if error.args else ""
    flag = next((arg.split("=")[0] for arg in argv if arg.startswith("--")
                 and key in arg.split("=")[0].lstrip("-").split(".")[1:]), None)
    return f"config override {flag or ''}: the config has no key '{key}'".replace(" :", ":")


def run(main: Callable[[list[str]], int | None], *, positional: int = 0) -> None:
    """Runs ``main`` as an absl app with her2jax's exit-code contract (2 = user error), under a
    umask of at least :data:`UMASK`.

    Args:
      main: receives argv (program name, then up to ``positional`` arguments).
      positional: how many non-flag arguments the program takes; more is a user error.
    """
    prog = Path(sys.argv[0]).name
    # Before any thread or file exists: os.umask can only be read by setting it.
    os.umask(os.umask(0) | UMASK)

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
        except OSError as e:
            # A --config file that could not be loaded surfaces when the flag is first read.
            message = config_file_error(e) or storage_error(e)
            if message is None:
                raise
            fail(prog, message)
        except KeyboardInterrupt:
            # Every writer cleans up on the way out (temporary folders removed, a training's
            # checkpoint finished); what is left to say is one line.
            print(f"{prog}: interrupted (Ctrl-C); nothing half-written was kept",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        return None

    app.run(wrapped, flags_parser=_flags_parser(prog))
