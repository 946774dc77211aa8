"""The one exception type for errors a user can cause (bad files, tables, flags, checkpoints)."""

from __future__ import annotations


class Her2jaxError(Exception):
    """A user-caused error, printed by every console script as one line with exit code 2.

    The message names what is wrong and why; ``patient``, ``file`` and ``key`` (any of them
    may be None) say where, and are kept as attributes so that ``--skip_invalid`` can list
    rejected cases in a table.

    Example: ``Her2jaxError("mask is empty", patient="P007", file="seg/P007.nii.gz")``
    reads ``patient P007: seg/P007.nii.gz: mask is empty``.
    """

    def __init__(self, reason: str, *, patient: str | None = None, file: str | None = None,
                 key: str | None = None):
        self.reason = " ".join(str(reason).split())  # always one line
        self.patient = patient
        self.file = None if file is None else str(file)
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.patient is not None:
            where.append(f"patient {self.patient}")
        if self.file is not None:
            where.append(self.file)
        if self.key is not None:
            where.append(f"key '{self.key}'")
        return ": ".join([*where, self.reason])
