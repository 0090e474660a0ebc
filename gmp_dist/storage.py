"""Where a run lives (design.md §5): run folder, checkpoint names, the newest-checkpoint rule, the final model.

One home for local paths and every URI ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://``, ``gs://``,
``hdfs://``, with query options such as ``?endpoint_override=127.0.0.1:9000&scheme=http``). Layouts::

    local runner:  <storage_path>/<name>/epoch_NNNN/checkpoint.pt
    Ray Train:     <storage_path>/<name>/checkpoint_<timestamp>/epoch_NNNN/checkpoint.pt
    both:          <storage_path>/<name>/final.pt      (the final model, a plain state_dict)
                   <storage_path>/<name>/mlflow_run_id.txt (the run's MLflow run id)

Both hold ``epoch_NNNN/checkpoint.pt``, so one rule picks the newest: highest epoch, then the later path
(Ray's timestamped folders sort in time order, so an epoch replayed after a restart wins).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from gmp_dist.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_MODEL_NAME = "final.pt"
# The MLflow run id, written when the run opens: a run stopped before its first checkpoint resumes into it.
RUN_ID_NAME = "mlflow_run_id.txt"
_EPOCH_FOLDER = re.compile(r"^epoch_(\d+)$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(text: str | os.PathLike) -> bool:
    """``scheme://...`` (MLflow's ``runs:/`` and ``models:/`` have one slash and are not storage URIs)."""
    return bool(_URI.match(str(text)))


def epoch_folder(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def checkpoint_file(folder: str | Path, epoch: int) -> Path:
    """Where a checkpoint of ``epoch`` (epochs completed) goes under a local folder."""
    return Path(folder) / epoch_folder(epoch) / CHECKPOINT_NAME


@dataclass(frozen=True)
class Location:
    """A file or folder: a pyarrow filesystem, the path inside it, and the text users see (query kept)."""

    fs: Any
    path: str
    text: str

    def __str__(self) -> str:
        return self.text

    @property
    def is_local(self) -> bool:
        return not is_uri(self.text)

    def child(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *parts])
        if self.is_local:
            return Location(self.fs, path, str(Path(self.text, *parts)))
        base, sep, query = self.text.partition("?")
        return Location(self.fs, path, "/".join([base.rstrip("/"), *parts]) + sep + query)

    @property
    def parent(self) -> "Location":
        path = self.path.rstrip("/").rsplit("/", 1)[0]
        if self.is_local:
            return Location(self.fs, path, str(Path(self.text).parent))
        base, sep, query = self.text.partition("?")
        return Location(self.fs, path, base.rstrip("/").rsplit("/", 1)[0] + sep + query)

    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise UserError(f"cannot reach {self.text}: {_first_line(exc)} (check the URI, its endpoint_override"
                            " and the credentials in the environment)") from None

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def files_named(self, name: str) -> list["Location"]:
        """Every file called ``name`` anywhere below this folder (none when it does not exist)."""
        from pyarrow.fs import FileSelector, FileType

        try:
            infos = self.fs.get_file_info(FileSelector(self.path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise UserError(f"cannot list {self.text}: {_first_line(exc)}") from None
        found = []
        for info in infos:
            if info.type == FileType.File and info.base_name == name:
                relative = info.path[len(self.path.rstrip("/")) + 1:]
                found.append(self.child(*relative.split("/")))
        return found

    def delete(self) -> None:
        from pyarrow.fs import FileType

        info = self._info()
        if info.type == FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == FileType.File:
            self.fs.delete_file(self.path)


def locate(path_or_uri: str | os.PathLike) -> Location:
    """A :class:`Location` for a local path (made absolute) or a storage URI."""
    from pyarrow import fs as pafs

    text = str(path_or_uri)
    if not is_uri(text):
        absolute = str(Path(text).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), absolute, absolute)
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:
        raise UserError(f"storage URI {text} is not understood by pyarrow.fs: {_first_line(exc)} (give a local"
                        " path or s3://bucket/path, gs://bucket/path, hdfs://host/path; S3-compatible servers:"
                        " s3://bucket/path?endpoint_override=HOST:PORT&scheme=http)") from None
    return Location(filesystem, path, text)


def run_folder(cfg) -> Location:
    """``<checkpoint.storage_path>/<name>``: a run's checkpoints and final model."""
    return locate(cfg.checkpoint.storage_path).child(cfg.name or "run")


def checkpoints(run: Location) -> list[Location]:
    """The run's checkpoint files, oldest first by the one rule (epoch folder, then path)."""
    def key(found: Location) -> tuple[int, str]:
        parent = found.path.rstrip("/").split("/")[-2] if "/" in found.path else ""
        match = _EPOCH_FOLDER.match(parent)
        return (int(match.group(1)) if match else -1, found.path)

    return sorted(run.files_named(CHECKPOINT_NAME), key=key)


def newest_checkpoint(run: Location) -> Optional[Location]:
    found = checkpoints(run)
    return found[-1] if found else None


def final_model(run: Location) -> Location:
    return run.child(FINAL_MODEL_NAME)


def write_run_id(run: Location, run_id: str) -> None:
    with writable(run.child(RUN_ID_NAME)) as path:
        path.write_text(run_id + "\n")


def read_run_id(run: Location) -> Optional[str]:
    marker = run.child(RUN_ID_NAME)
    if not marker.is_file():
        return None
    with local_file(marker) as path:
        return path.read_text().strip() or None


def ray_storage(storage_path: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's RunConfig: a local absolute path and None, or the
    path inside the bucket and the filesystem the URI's query configured."""
    where = locate(storage_path)
    return (where.path, None) if where.is_local else (where.path, where.fs)


@contextlib.contextmanager
def local_file(source: str | os.PathLike | Location) -> Iterator[Path]:
    """A local path to read ``source``: itself when local, else a temporary download removed on exit."""
    where = source if isinstance(source, Location) else locate(source)
    if where.is_local:
        yield Path(where.path)
        return
    if not where.is_file():
        raise UserError(f"{where.text} does not exist or is not a file")
    with tempfile.TemporaryDirectory(prefix="gmp-download-") as tmp:
        target = Path(tmp) / where.path.rstrip("/").split("/")[-1]
        with where.fs.open_input_stream(where.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
        yield target


@contextlib.contextmanager
def writable(dest: Location) -> Iterator[Path]:
    """A local path to write ``dest`` through: itself when local, else a temp file uploaded on a clean exit."""
    if dest.is_local:
        Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
        yield Path(dest.path)
        return
    with tempfile.TemporaryDirectory(prefix="gmp-upload-") as tmp:
        staged = Path(tmp) / dest.path.rstrip("/").split("/")[-1]
        yield staged
        upload(staged, dest)


def upload(local: Path, dest: Location) -> None:
    """Copy a local file to ``dest`` (object stores write the object whole on close: never half there)."""
    if dest.is_local:
        Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest.path)
        return
    dest.fs.create_dir(dest.parent.path, recursive=True)
    with open(local, "rb") as src, dest.fs.open_output_stream(dest.path) as out:
        shutil.copyfileobj(src, out, length=8 << 20)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
