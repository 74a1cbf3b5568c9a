"""What a path on disk is, asked without trusting it: every failure of the question itself (a
name too long, a loop of symbolic links, no permission, a NUL byte) becomes the one-line error
naming the path, and special files (FIFOs, devices, sockets) are named as what they are."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from r2m_ext.errors import R2MError

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISREG, "regular file"),
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def kind_name(mode: int) -> str:
    """'regular file', 'directory', 'FIFO', ... for an st_mode."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def stat_path(path: Path, follow_symlinks: bool = True) -> os.stat_result | None:
    """os.stat (or lstat) of `path`, None when nothing is there; any other failure is an
    R2MError naming the path."""
    try:
        return os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    except ValueError:  # an embedded NUL byte
        raise R2MError(f"{path!r}: not a usable path (it holds a NUL byte)") from None
    except OSError as error:
        if error.errno == errno.ENOTDIR:  # a component of the path is a file: nothing there
            return None
        raise R2MError(f"{path}: {error.strerror or error}") from None


def require_regular_file(path: Path, what: str) -> None:
    """Raises, naming the path and what it should be, unless a regular file is there (following
    links): a FIFO or a device would block a read or never end it."""
    found = stat_path(path)
    if found is None:
        raise R2MError(f"{path}: cannot read {what} (no such file)")
    if not stat.S_ISREG(found.st_mode):
        raise R2MError(f"{path}: the {what} is a {kind_name(found.st_mode)}, not a regular file")


def resolved(path: Path) -> Path:
    """The absolute path with every symbolic link resolved (the file a read really reaches)."""
    try:
        return path.resolve()
    except ValueError:  # an embedded NUL byte
        raise R2MError(f"{path!r}: not a usable path (it holds a NUL byte)") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        reason = getattr(error, "strerror", None) or error
        raise R2MError(f"{path}: cannot resolve ({reason})") from None


def is_within(path: Path, directory: Path) -> bool:
    """`path` is `directory` or lies under it (both already resolved)."""
    return path == directory or directory in path.parents
