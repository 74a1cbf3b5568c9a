"""What may stand at a merge's output path, and what `--overwrite` may replace there.

A merge writes a directory. It may take the place of nothing, of an empty directory, or (with
`--overwrite`) of an earlier r2m_ext output, recognised by its manifest: r2m_manifest.json lists
every file the merge wrote with its size and modification time, as rsync and git tell a file
unchanged. Anything else at the path (a regular file, a device, a FIFO, a socket, a symbolic
link, a directory holding a file the manifest does not list or one changed since) is never
replaced, with or without `--overwrite`: removing it is left to the user, on purpose. The same
check runs again just before the replacement, so content added during a long merge is safe too.

Inputs are protected separately (`check_inputs_apart`): no file the merge reads, resolved
through symbolic links and index entries, may be the output, lie inside it or contain it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from r2m_ext.errors import R2MError
from r2m_ext.io.paths import is_within, kind_name, resolved, stat_path

MANIFEST_FILE = "r2m_manifest.json"


def partial_dir(out: Path) -> Path:
    """Where a merge into `out` is assembled before it is renamed into place."""
    return out.parent / f".{out.name}.r2m-partial"


def manifest_text(directory: Path, names: Iterable[str]) -> str:
    """The manifest of the complete files `names` in `directory`."""
    files = {}
    for name in sorted(names):
        found = os.stat(directory / name, follow_symlinks=False)
        files[name] = {"size": found.st_size, "mtime_ns": found.st_mtime_ns}
    return json.dumps({"files": files}, indent=1) + "\n"


def _manifest_files(out: Path) -> dict[str, dict] | None:
    path = out / MANIFEST_FILE
    found = stat_path(path, follow_symlinks=False)
    if found is None or not stat.S_ISREG(found.st_mode):
        return None
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def _foreign_entry(out: Path) -> str | None:
    """Why the non-empty directory `out` is not an unchanged r2m_ext output, or None if it is."""
    files = _manifest_files(out)
    if files is None:
        return f"it has no readable {MANIFEST_FILE}, so it is not an r2m_ext output"
    for name in sorted(os.listdir(out)):
        if name == MANIFEST_FILE:
            continue
        found = stat_path(out / name, follow_symlinks=False)
        recorded = files.get(name)
        if recorded is None:
            return f"it holds {name!r}, which r2m_ext did not write"
        if found is None:
            continue
        if not stat.S_ISREG(found.st_mode):
            return f"its {name!r} is a {kind_name(found.st_mode)} now"
        if (found.st_size, found.st_mtime_ns) != (recorded.get("size"), recorded.get("mtime_ns")):
            return f"its {name!r} changed after r2m_ext wrote it"
    return None


def check_output_target(out: Path, overwrite: bool) -> bool:
    """Raises unless a merge may write its directory at `out`: nothing there, an empty
    directory, or with `overwrite` an unchanged earlier r2m_ext output. Returns whether
    something is there that the commit will replace."""
    found = stat_path(out, follow_symlinks=False)
    if found is None:
        return False
    if not stat.S_ISDIR(found.st_mode):
        raise R2MError(
            f"output {out} is a {kind_name(found.st_mode)}; a merge writes a directory and never "
            "replaces anything else: remove it yourself or choose another --out"
        )
    try:
        empty = not os.listdir(out)
    except OSError as error:
        raise R2MError(f"output {out}: cannot list it ({error.strerror or error})") from None
    if empty:
        return True
    if not overwrite:
        raise R2MError(
            f"output {out} exists and is not empty; pass --overwrite to replace an earlier "
            "r2m_ext output"
        )
    reason = _foreign_entry(out)
    if reason is not None:
        raise R2MError(
            f"output {out} is not replaced: {reason} (--overwrite replaces only an unchanged "
            "r2m_ext output or an empty directory); remove it yourself or choose another --out"
        )
    return True


def remove_replaced(directory: Path, out: Path) -> None:
    """Deletes a replaced output that `check_output_target` accepted: its entries that the
    manifest lists, and the manifest. Names come from the directory, never from the manifest (a
    listed "../x" would reach outside it); anything that appeared meanwhile stays, and is
    reported."""
    listed = {*(_manifest_files(directory) or {}), MANIFEST_FILE}
    for name in os.listdir(directory):
        if name in listed:
            (directory / name).unlink()
    try:
        os.rmdir(directory)
    except OSError:
        raise R2MError(
            f"merged into {out}, but files that appeared in the replaced output during the merge "
            f"were kept in {directory}"
        ) from None


def check_inputs_apart(out: Path, inputs: Iterable[Path], files_read: Iterable[Path]) -> None:
    """Raises if the output (or its partial directory) is, holds or lies inside anything the
    merge reads: the input paths as given and every file read, through symbolic links."""
    targets = [resolved(out), resolved(partial_dir(out))]
    for path in inputs:
        real = resolved(path)
        for target in targets:
            if real == target:
                raise R2MError(f"output {out} is the input {path}; choose another --out")
            if is_within(target, real):
                raise R2MError(f"output {out} is inside the input {path}; choose another --out")
            if is_within(real, target):
                raise R2MError(f"input {path} is inside the output {out}; choose another --out")
    for file in files_read:
        real = resolved(file)
        for target in targets:
            if is_within(real, target):
                via = "" if real == file.absolute() else f" (through a link, it is {real})"
                raise R2MError(
                    f"input file {file}{via} is inside the output {out}; choose another --out"
                )
    # The same file reached by another route (a hard link, a bind mount) has the same identity.
    found = stat_path(out, follow_symlinks=False)
    if found is not None and stat.S_ISDIR(found.st_mode):
        kept = {
            (found.st_dev, found.st_ino)
            for name in os.listdir(out)
            if (found := stat_path(out / name, follow_symlinks=False)) is not None
        }
        for file in files_read:
            found = stat_path(file)
            if found is not None and (found.st_dev, found.st_ino) in kept:
                raise R2MError(f"input file {file} is also a file of the output {out}")
