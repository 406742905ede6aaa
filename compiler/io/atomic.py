"""Atomic outputs: claim the path, write a temporary sibling, rename it into place.

``claim_output`` checks the path (``compiler.io.paths``), takes a lock beside it
(``.NAME.editc-lock``, ``flock``: a second writer of the same path is refused with exit 2, and
a killed writer's lock dies with it), and cleans what killed writers left (their
``.NAME.tmp-PID-*`` temporaries; a ``.NAME.old-PID-*`` moved aside when ``NAME`` itself is
missing is renamed back). ``OutputClaim.staging()`` yields the temporary path; when the block
ends without an exception it becomes ``NAME``:

- nothing there: ``renameat2(RENAME_NOREPLACE)`` (a plain rename where that is missing);
- ``--force`` over an existing output: ``renameat2(RENAME_EXCHANGE)`` swaps the two in one
  step, then the old one (now under the temporary name) is deleted; where the kernel or the
  filesystem cannot exchange, the old output is moved aside first, and a kill between the two
  renames is repaired by the next claim (the old output is renamed back).

So at every instant ``NAME`` holds the old output or the new one, never a half. On an exception
the temporary is deleted; a disk-full, size-limit or permission error becomes a ``UserError``
(one line, exit 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from compiler.errors import UserError
from compiler.io.paths import PathLike, check_output_path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit reached", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}
_DISK_MESSAGES = (("No space left", errno.ENOSPC), ("StorageFull", errno.ENOSPC),
                  ("File too large", errno.EFBIG), ("FileTooLarge", errno.EFBIG),
                  ("Permission denied", errno.EACCES))

_held: dict[Path, int] = {}  # outputs this process has claimed, with how many times (re-entrant)


def _libc_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _libc_renameat2()


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2``; False where the system cannot (no syscall, filesystem refuses the flag)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _exchange(source: Path, target: Path) -> bool:
    return _rename2(source, target, _RENAME_EXCHANGE)


def _checkpoint(stage: str) -> None:
    """A named point between two steps of a replace; fault-injection tests kill the process here."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def disk_error(err: BaseException, path: Path) -> UserError | None:
    """One line for a disk-full / size-limit / permission failure (also when a library wrapped
    the OSError into its own exception); None for anything else."""
    for candidate in (err, err.__cause__, err.__context__):
        if isinstance(candidate, OSError) and candidate.errno in _DISK_ERRNOS:
            where = candidate.filename or path
            return UserError(f"{path}: could not write the output ({_DISK_ERRNOS[candidate.errno]} at {where}); "
                             f"nothing was written, free space or choose another output path")
    text = str(err)
    for needle, code in _DISK_MESSAGES:
        if needle in text:
            return UserError(f"{path}: could not write the output ({_DISK_ERRNOS[code]}); nothing was "
                             f"written, free space or choose another output path")
    return None


class OutputClaim:
    """One output path, locked for this process until ``release()``."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._fd: int | None = None
        self._created: Path | None = None  # the topmost parent folder the claim had to create
        self.committed = False

    # -- the lock ------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.editc-lock"

    def acquire(self) -> None:
        if self.path in _held:
            _held[self.path] += 1
            return
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(err, self.path) or UserError(f"{self.path}: cannot create its folder ({err.strerror})") from None
        self._created = missing[-1] if missing else None
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                self._remove_created()
                raise disk_error(err, self.path) or UserError(f"{self.path}: cannot lock it ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{self.path}: another editc process{f' (pid {holder})' if holder else ''} is "
                                f"writing this output now; wait for it to finish or choose another output path") from None
            try:  # the holder before us may have unlinked the file we opened: lock the live one
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        _held[self.path] = 1
        self._recover()

    def release(self) -> None:
        if self.path not in _held:
            return
        _held[self.path] -= 1
        if _held[self.path] or self._fd is None:
            return
        del _held[self.path]
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None
        if not self.committed:
            self._remove_created()

    def _remove_created(self) -> None:
        if self._created is not None and not self.path.exists():
            with contextlib.suppress(OSError):  # only folders we made and that are still empty
                for folder in (self.path.parent, *self.path.parent.parents):
                    os.rmdir(folder)
                    if folder == self._created:
                        break

    def _recover(self) -> None:
        """Clean up after killed writers of this path (we hold the lock, so none is running)."""
        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.(tmp|old)-(\d+)(?:-[0-9a-f]+)?")  # (older editc: no suffix)
        leftovers = []
        for entry in self.path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and int(match[2]) != os.getpid() and not _alive(int(match[2])):
                leftovers.append((match[1] != "old", entry))
        for is_temporary, entry in sorted(leftovers):
            if not is_temporary and not (self.path.exists() or self.path.is_symlink()):
                os.rename(entry, self.path)  # a replace was killed half-way: the old output returns
            else:
                _remove(entry)

    # -- writing -------------------------------------------------------------------------------
    def _temporary(self, tag: str) -> Path:
        return self.path.parent / f".{self.path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A temporary path beside the output (an empty folder for a "dir" claim; for a "file"
        claim a path the caller creates), renamed into place when the block succeeds."""
        temporary = self._temporary("tmp")
        try:
            if self.kind == "dir":
                temporary.mkdir()
            yield temporary
            if self.kind == "file" and not temporary.is_file():
                raise RuntimeError(f"the writer did not create {temporary}")
            self._commit(temporary)
        except BaseException as err:
            _remove(temporary)
            if isinstance(err, Exception) and not isinstance(err, UserError):
                friendly = disk_error(err, self.path)
                if friendly is not None:
                    raise friendly from None
            raise

    def _commit(self, temporary: Path) -> None:
        final = self.path
        if final.exists() or final.is_symlink():
            if _exchange(temporary, final):
                _checkpoint("exchanged")
                _remove(temporary)  # the old output, now under the temporary name
            else:
                aside = self._temporary("old")
                os.rename(final, aside)
                _checkpoint("moved-aside")
                try:
                    os.rename(temporary, final)
                except BaseException:
                    os.rename(aside, final)
                    raise
                _remove(aside)
        elif not _rename2(temporary, final, _RENAME_NOREPLACE):
            os.rename(temporary, final)
        self.committed = True


@contextlib.contextmanager
def claim_output(out_path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (),
                 kind: str = "dir") -> Iterator[OutputClaim]:
    """Check and lock ``out_path`` for the duration of the block (see the module docstring).

    Call it before loading a model, so that a bad or busy output is refused in a second.
    """
    path = check_output_path(out_path, force=force, inputs=inputs, kind=kind)
    claim = OutputClaim(path, kind)
    claim.acquire()
    try:
        if not force and (path.exists() or path.is_symlink()):  # appeared while we waited
            raise UserError(f"{path}: already exists; pass --force to replace it or choose another output path")
        yield claim
    finally:
        claim.release()


@contextlib.contextmanager
def atomic_output_dir(out_dir: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; it becomes ``out_dir`` on success."""
    with claim_output(out_dir, force=force, inputs=inputs, kind="dir") as claim, claim.staging() as folder:
        yield folder


@contextlib.contextmanager
def atomic_output_file(out_path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary file path (not yet created) beside ``out_path``; it becomes ``out_path``
    on success."""
    with claim_output(out_path, force=force, inputs=inputs, kind="file") as claim, claim.staging() as file:
        yield file


def write_atomically(out_path: PathLike, data: bytes | str, *, force: bool = False,
                     inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``out_path`` atomically."""
    with atomic_output_file(out_path, force=force, inputs=inputs) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out_path))))
