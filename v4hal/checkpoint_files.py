"""Which checkpoint files may be opened, and the error naming a bad one: the rules every reader of
checkpoints shares (the model's loader, the converter, `verify`). It sits below model/ and
conversion/, which both read checkpoints and import neither each other's internals nor this
one's callers (docs/conversion.md, Safety)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

HF_REPO_KINDS = ("models--", "datasets--", "spaces--")  # Hugging Face cache folders: <kind><org>--<name>


class CheckpointError(RuntimeError):
    """A source shard is truncated, corrupt or disagrees with its index; names file and tensor."""

    def __init__(self, file: str | os.PathLike, problem: str, tensor: str | None = None):
        self.file, self.tensor, self.problem = str(file), tensor, problem
        where = f"{self.file}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # raised in a worker process, re-raised in the parent: pickled by its fields
        return type(self), (self.file, self.problem, self.tensor)


def confined(folder: str | os.PathLike, name: str | os.PathLike, regular: bool = True, hf_cache: bool = False) -> Path:
    """`folder / name` with every symlink resolved, refused (CheckpointError) unless it stays inside
    `folder`: names read from a journal, manifest, index or sidecar, and symlinked files, must not
    reach other files. With `hf_cache` (sources only: never for a folder files are deleted from),
    one more place is allowed, the layout of the Hugging Face cache: `folder` is
    `<cache>/models--org--name/snapshots/<rev>` and the file resolves into that same repo's
    `blobs/`. With `regular`, it must also exist and be a regular file (opening a FIFO or device
    would hang or read forever). The one check every path the converter, loader and verify read
    or delete goes through."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path == root or not (path.is_relative_to(root) or (hf_cache and in_hf_blobs(root, path))):
        raise CheckpointError(root / name, f"leads to {path}, outside {root}; refused (files must stay inside their folder)")
    if regular:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CheckpointError(root / name, "missing") from None
        if not stat.S_ISREG(mode):
            raise CheckpointError(root / name, "not a regular file (a FIFO, device, socket or directory); refused")
    return path


def in_hf_blobs(snapshot: Path, path: Path) -> bool:
    """Whether resolved `path` is a blob of the Hugging Face cache repo whose snapshot folder
    (resolved) is `snapshot`: <repo>/snapshots/<rev> -> <repo>/blobs/<file>."""
    repo = snapshot.parent.parent
    return (snapshot.parent.name == "snapshots" and repo.name.startswith(HF_REPO_KINDS)
            and path.parent == repo / "blobs")
