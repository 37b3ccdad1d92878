"""The output folder as a transaction: one merge per folder at a time, and a swap that survives a kill.

A merge into ``NAME`` works beside it in hidden folders named ``.NAME.lazymoe-KIND``:

* ``partial-ID``: being written; never complete, always safe to delete.
* ``new``: complete, about to become NAME.
* ``old``: the earlier output that ``overwrite`` replaces, moved aside; complete.
* ``trash-ID``: an old output being deleted; always safe to delete.

Every step of the swap is one rename, so at every instant the old or the new complete output exists
as NAME, ``new`` or ``old``. A merge holds ``.NAME.lazymoe-lock`` (an ``flock``, which the kernel drops
when its process dies, whatever its PID) from start to end. Holding it proves that every work folder of
NAME was left by a merge that is gone, so :meth:`OutputTarget.recover` can finish or undo its swap
without guessing from PIDs, which containers reuse (a lazymoe running as PID 1 meets PID 1 again).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from .folder import foreign_entries, is_lazymoe_output
from ..errors import (InsufficientResourcesError, OutputBusyError, OutputExistsError, OutputNotWritableError, Setting,
                      Text)

try:  # POSIX; elsewhere merges into one folder are not guarded against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

_PREFIX = ".{name}.lazymoe-"
#: free disk kept in reserve beyond what a step writes (logs, caches, filesystem slack); every disk check adds it
DISK_MARGIN_BYTES = 64 << 20
#: errors that mean "the disk is full" (ENOSPC) or "your quota is" (EDQUOT)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

#: test hook: called with the name of each step of :meth:`OutputTarget.commit` just before it runs
on_step: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if on_step is not None:
        on_step(name)


def work_name(name: str, kind: str) -> str:
    return _PREFIX.format(name=name) + kind


def final_name(folder_name: str) -> str:
    """The output name a work folder belongs to (``.moe.lazymoe-partial-1f2e`` -> ``moe``); others unchanged."""
    if folder_name.startswith(".") and ".lazymoe-" in folder_name:
        return folder_name[1:].rsplit(".lazymoe-", 1)[0]
    return folder_name


def _present(path: Path) -> bool:
    """Something the user could care about is at ``path`` (an empty folder is nothing)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def disk_full_error(err: OSError, where: Path | str | None, need: str | None = None, *,
                    cleaned: bool = True) -> InsufficientResourcesError:
    """The one message for a disk that filled up while writing at ``where``: ``need``, how much a run needs when
    the caller knows it; ``cleaned``, whether the caller removed what it had half-written."""
    at, there = (f" at {where}", " there") if where else ("", "")
    kept = "; nothing half-written was kept" if cleaned else ""
    free = f"Free at least {need}{there}" if need else f"Free space{there}"
    return InsufficientResourcesError(
        f"The disk{at} filled up while writing ({os.strerror(err.errno)}){kept}. {free} (or choose an output folder "
        "on a larger disk) and run again."
    )


class OutputTarget:
    """``with OutputTarget(path) as target:`` locks ``path``'s name, recovers what a killed merge left,
    and lets :meth:`approve`, :meth:`work_folder` and :meth:`commit` run the swap."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir)
        try:
            is_link = self.path.is_symlink()
            # not a link (refused below), so resolving only settles ".", ".." and parents
            self.final = self.path if is_link else self.path.resolve()
            mount = not is_link and self.final.is_mount()
        except (OSError, RuntimeError) as err:  # a name too long for the filesystem, a loop of links above it
            why = getattr(err, "strerror", None) or err
            raise OutputNotWritableError(f"{self.path} cannot be the output folder ({why}); give a shorter path "
                                         "without link loops.") from None
        if is_link:
            raise OutputExistsError(
                f"{self.path} is a symbolic link; lazymoe never writes through or replaces a link. "
                "Give the folder it points to, or a new path."
            )
        self.parent, self.name = self.final.parent, self.final.name
        if not self.name:
            raise OutputExistsError(f"{self.path} is the filesystem root; give a folder for the merged model.")
        if mount:
            # the merge is written beside the output folder and renamed into place: beside a mount point is
            # the parent's disk, where the rename could not even land
            raise OutputExistsError(f"{self.path} is a mount point (a disk of its own); give a folder inside it, "
                                    f"e.g. {self.path / 'merged'}.")
        self._lock_fd: int | None = None
        self._approved: tuple[int, int] | None = None
        self._approved_set = False
        self._partial: Path | None = None

    def _work(self, kind: str) -> Path:
        return self.parent / work_name(self.name, kind)

    # ------------------------------------------------------------------ lock
    def __enter__(self) -> OutputTarget:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputExistsError(f"{self.parent} exists and is not a folder; choose another output path.") from None
        except OSError as err:
            raise self._not_writable(err) from None
        self._lock()
        try:
            self.recover()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._partial is not None:
                shutil.rmtree(self._partial, ignore_errors=True)
        finally:
            self._unlock()

    def _not_writable(self, err: OSError) -> OutputNotWritableError:
        return OutputNotWritableError(
            f"Cannot write the output next to {self.final} ({err.strerror or err}); choose an output folder on a "
            "disk you can write to."
        )

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self._work("lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise self._not_writable(err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"Another lazymoe merge is writing {self.final} right now; wait until it ends, or merge into "
                    "another folder."
                ) from None
            except OSError as err:  # a filesystem without locks (some network mounts): go on unguarded
                logger.warning("cannot lock %s (%s); do not run two merges into it at once", path, err.strerror)
                os.close(fd)
                return
            if _identity(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                self._lock_fd = fd
                return
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            Path(self._work("lock")).unlink(missing_ok=True)  # while still held, so nobody locks a deleted file
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ recovery
    def _kinds(self, kind: str) -> list[Path]:
        return sorted(self.parent.glob(glob.escape(_PREFIX.format(name=self.name)) + kind))

    def recover(self) -> int:
        """Finish or undo what a killed merge into this name left behind; returns the bytes freed.

        Called with the lock held, so no merge that left these folders is still running.
        """
        freed = 0
        for folder in self._kinds("partial-*") + self._kinds("trash-*"):
            freed += self._delete(folder)
        new, old = self._work("new"), self._work("old")
        if new.is_dir():
            if not _present(self.final):
                self._place(new)
                logger.warning("restored %s: a merge finished it but was stopped before renaming it", self.final)
            elif is_lazymoe_output(self.final, follow_links=False) and not old.exists() and \
                    not foreign_entries(self.final):  # files added since the stop are the user's: never replaced
                os.replace(self.final, old)  # the stopped merge had approved replacing it
                self._place(new)
                logger.warning("finished replacing %s, which a stopped merge had built", self.final)
            else:
                logger.warning("%s holds a finished merge that could not replace %s; move it where you want it",
                               new, self.final)
        for folder in [old, *self._kinds("old-*")]:  # old-PID: saved aside by lazymoe <= 0.x
            if not folder.is_dir() or new.exists():
                continue
            if not _present(self.final):
                self._place(folder)
                logger.warning("restored %s from %s, where a stopped merge had moved it aside", self.final, folder)
            else:
                freed += self._delete(folder)
        return freed

    def _place(self, folder: Path) -> None:
        if self.final.is_dir() and not self.final.is_symlink():
            self.final.rmdir()  # empty: nothing is lost
        os.replace(folder, self.final)

    def _delete(self, folder: Path) -> int:
        """Delete a work folder, renaming it to ``trash-ID`` first so a kill midway leaves a name we delete."""
        if not folder.name.startswith(work_name(self.name, "trash-")):
            trash = self._work(f"trash-{secrets.token_hex(4)}")
            os.replace(folder, trash)
            folder = trash
        _step("delete")
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, left by an interrupted merge", folder)
        return size

    # ------------------------------------------------------------------ the merge
    def approve(self, overwrite: bool) -> None:
        """Refuse an output we must not touch; remember the one we may replace, so nothing else is."""
        out = self.final
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is a file; choose another output folder.")
        if _present(out):
            ours = is_lazymoe_output(out, follow_links=False)
            if not (overwrite and ours):
                replace = Setting("overwrite", True)
                hint = (Text(f"{replace.placeholder} to replace it", (replace,)) if ours else
                        "it was not made by lazymoe, so it is never replaced; choose an empty or new folder")
                raise OutputExistsError(Text.join([f"{out} already exists and is not empty: ", hint, "."]))
            self._refuse_foreign(out)
            self._approved = _identity(out)
        self._approved_set = True

    @staticmethod
    def _refuse_foreign(out: Path) -> None:
        """An earlier output is replaced whole: refuse when the user keeps files of their own in it."""
        mine = foreign_entries(out)
        if mine:
            more = f" and {len(mine) - 5} more" if len(mine) > 5 else ""
            raise OutputExistsError(
                f"{out} holds files that are not part of a merged model ({', '.join(mine[:5])}{more}); replacing the folder would "
                "delete them. Move them out of it, or merge into another folder."
            )

    def work_folder(self) -> Path:
        """A fresh hidden folder to assemble the output in (deleted on failure)."""
        folder = self._work(f"partial-{secrets.token_hex(4)}")
        try:
            folder.mkdir()
        except OSError as err:
            if err.errno in DISK_FULL:
                raise disk_full_error(err, self.parent, "a few MB") from None
            raise self._not_writable(err) from None
        self._partial = folder
        return folder

    def commit(self) -> Path:
        """Put the finished work folder in place, replacing only the output :meth:`approve` accepted."""
        assert self._approved_set and self._partial is not None, "approve() and work_folder() come first"
        new, old, out = self._work("new"), self._work("old"), self.final
        if new.exists() or old.exists():
            raise OutputExistsError(f"{new} or {old} is in the way; move it away and merge again.")
        _step("complete")
        os.replace(self._partial, new)  # from here on the result is complete and recognised by recover()
        self._partial = None
        now = _identity(out) if _present(out) else None
        if now is not None and now != self._approved:
            raise OutputExistsError(
                f"{out} was created or changed by something else while the merge ran, so it was left as it is. "
                f"The finished merge is in {new}: move it where you want it."
            )
        if now is not None:
            try:
                self._refuse_foreign(out)  # files added to it while the merge ran are the user's too
            except OutputExistsError as err:
                raise OutputExistsError(f"{err} The finished merge is in {new}.") from None
            _step("aside")
            os.replace(out, old)
        elif out.is_dir():
            try:
                out.rmdir()  # an empty folder, perhaps made meanwhile: nothing is lost
            except OSError:  # not empty any more: someone is writing there right now
                raise OutputExistsError(
                    f"{out} was created or changed by something else while the merge ran, so it was left as it is. "
                    f"The finished merge is in {new}: move it where you want it."
                ) from None
        _step("swap")
        try:
            os.replace(new, out)
        except OSError as err:  # something took the name after the check
            if now is not None and not out.exists():
                os.replace(old, out)
            raise OutputExistsError(
                f"{out} was created by something else while the merge ran ({err.strerror}); it was left as it is. "
                f"The finished merge is in {new}: move it where you want it."
            ) from None
        if now is not None:
            _step("discard")
            self._delete(old)
        _step("done")
        return out
