"""Writing a file or a directory so that readers find the old version or the new one, never a
half-written one and never none.

Everything zerotrain writes for a user (final/, tokenizer/, prepared data, consolidated weights,
adapters, checkpoint sidecars, plots, reports) is built under a temporary name beside its target
and then put in place in one step:

- a file: `os.replace`, atomic on POSIX;
- a directory: `rename(2)` cannot replace a non-empty directory, so the new and the old one are
  exchanged atomically (Linux `renameat2(RENAME_EXCHANGE)`), after which the old one, now under
  the temporary name, is removed. Where the filesystem cannot exchange (some network
  filesystems, non-Linux), the old directory is renamed aside first and removed only after the
  new one is in place; a crash between those two renames leaves it complete as `.NAME.old-...`
  beside the target, and the next publish of that target renames it back first.

The old target is never deleted before the new one is complete and in place.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from common.errors import ZerotrainError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    """glibc's renameat2 (2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of two existing paths in one step; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the kernel or this filesystem does not support the exchange
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove(path: Path) -> None:
    """Delete a file, link or directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def temporary_name(target: Path, what: str = "tmp") -> Path:
    """A fresh name beside `target` (same directory, hence same filesystem), hidden by a dot."""
    return target.with_name(f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def put_in_place(new: Path, target: Path) -> None:
    """Make `new` (a complete file or directory) appear at `target`, replacing what is there."""
    if not new.is_dir():
        os.replace(new, target)
        return
    try:
        os.rename(new, target)  # no target yet (or an empty directory): one step
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if exchange(new, target):
        remove(new)  # the old target, now under the temporary name
        return
    old = temporary_name(target, "old")
    os.rename(target, old)
    os.rename(new, target)
    remove(old)


def recover(target: Path) -> None:
    """Put back an old `target` that a crash left aside mid-publish (see the module docstring)."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.rename(aside[-1], target)


@contextmanager
def publishing(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write into (created empty when `directory`);
    once the body returns it replaces `target`. On any error the temporary is removed and
    `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = temporary_name(target)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        put_in_place(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically."""
    with publishing(path) as tmp:
        tmp.write_text(text)


def check_apart(output: str | os.PathLike, sources: Iterable[tuple[str, str | os.PathLike | None]], *,
                inside_ok: bool = False) -> None:
    """Refuse to write `output` where putting it in place would destroy what it is made from: an
    output that is or contains one of `sources` ((what it is, path) pairs; None paths are
    skipped), or lies inside one unless `inside_ok` (a folder a few files are read from, such as
    a tokenizer's). Publishing replaces the target whole, so `consolidate RUN/checkpoints RUN
    --overwrite` would otherwise swap the run directory for the model read out of it."""
    out = Path(output).resolve()
    for what, source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if out == src or src.is_relative_to(out) or (out.is_relative_to(src) and not inside_ok):
            relation = "is" if out == src else "contains" if src.is_relative_to(out) else "lies inside"
            raise ZerotrainError(f"output {output} {relation} {what} {source}, which it is made from: writing it "
                                 "there would replace what is being read; choose an output outside it")
