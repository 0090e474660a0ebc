"""Atomic conversion outputs: every file is written under a temporary name and renamed at the end.

An interrupted conversion (Ctrl-C, SIGKILL, a full disk) therefore never leaves a file under a
finished name; ``manifest.json`` is renamed last, so a folder with a manifest is complete.
Temporary names carry the writer's pid (``train.beton.<pid>.partial``): several processes may
convert the same data set at once (digits on first use) and the last rename simply wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Optional, Sequence

from gmp_dist.data.formats import MANIFEST
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary files left by conversions whose process is gone (killed, crashed)."""
    removed = []
    for path in folder.glob(f"*{PARTIAL_SUFFIX}"):
        pid_text = path.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted conversion in %s", len(removed), folder)
    return removed


class StagedOutputs:
    """The files one conversion produces in ``folder``; use as a context manager.

    ``names`` are the finished file names, in the order they are renamed (``manifest.json`` is
    always renamed last). ``obsolete`` names are deleted at commit when present: outputs of an
    earlier conversion that this one does not produce (e.g. ``.beton`` files when FFCV is gone).
    """

    def __init__(self, folder: Path, names: Sequence[str], overwrite: bool,
                 obsolete: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.names = [n for n in names if n != MANIFEST] + ([MANIFEST] if MANIFEST in names else [])
        self.obsolete = [n for n in obsolete if n not in self.names]
        existing = [self.folder / n for n in [*self.names, *self.obsolete] if (self.folder / n).exists()]
        if existing and not overwrite:
            listed = ", ".join(str(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            raise UserError(f"output already exists: {listed}; pass --overwrite to replace it, "
                            "or choose another --out folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.folder)
        self._temp = {n: self.folder / f"{n}.{os.getpid()}{PARTIAL_SUFFIX}" for n in self.names}
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write ``name`` now (a temporary path)."""
        return self._temp[name]

    def final(self, name: str) -> Path:
        return self.folder / name

    def commit(self) -> list[Path]:
        missing = [n for n, p in self._temp.items() if not p.is_file()]
        if missing:
            raise AssertionError(f"conversion did not write {missing}")
        for name in self.obsolete:
            (self.folder / name).unlink(missing_ok=True)
        for name in self.names:
            os.replace(self._temp[name], self.folder / name)
        self.committed = True
        return [self.folder / n for n in self.names]

    def discard(self) -> None:
        for path in self._temp.values():
            path.unlink(missing_ok=True)

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if not self.committed:
            self.discard()


def available_cpus() -> int:
    """CPUs this process may run on (FFCV fails when asked for more workers than that)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_cpus() -> int:
    """CPUs meant for this process: OMP_NUM_THREADS when set (Ray sets it to a worker's CPU
    share), else every CPU it may run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(int(omp), available_cpus())) if omp.isdigit() and int(omp) > 0 else available_cpus()


class ConversionResult:
    """What a converter wrote: shown by `gmp-dist data` and checked by tests."""

    def __init__(self, folder: Path, files: list[Path], num_train: int, num_val: int,
                 skipped: Sequence[str] = (), skipped_log: Optional[Path] = None) -> None:
        self.folder, self.files = folder, files
        self.num_train, self.num_val = num_train, num_val
        self.skipped, self.skipped_log = list(skipped), skipped_log

    def __repr__(self) -> str:
        return (f"ConversionResult(folder={str(self.folder)!r}, train={self.num_train}, val={self.num_val}, "
                f"skipped={len(self.skipped)})")
