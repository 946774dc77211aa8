"""her2jax-report: one self-contained report.html of an evaluated workdir.

  her2jax-report WORKDIR [--data_dir=DIR] [--out=FILE]

Reads what ``her2jax --mode=train|eval|analyze`` wrote in WORKDIR and writes
``WORKDIR/report.html`` (or ``--out``), with its figures in ``WORKDIR/report_files/``; prints
where. ``--data_dir`` says where the prepared dataset is now, for the cohort table. A folder
that is not a workdir, or a workdir not evaluated yet, is refused in one line (exit 2).
The page is described in ``her2jax.analysis.report``.
"""

from __future__ import annotations

from absl import flags

from her2jax import cli
from her2jax.errors import Her2jaxError

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the prepared dataset is now (for the "
                                "cohort table; default: the config's data.data_dir).")
_OUT = flags.DEFINE_string("out", None, "Write the page here instead of WORKDIR/report.html.")


def _main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise Her2jaxError("a workdir is needed: her2jax-report WORKDIR [--out=FILE]")
    from her2jax.analysis import report  # after flag parsing: --help stays fast

    path = report.write_report(argv[1], data_dir=_DATA_DIR.value, out=_OUT.value)
    print(f"wrote {path}", flush=True)


def main() -> None:
    cli.run(_main, positional=1)


if __name__ == "__main__":
    main()
