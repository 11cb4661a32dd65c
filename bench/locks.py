"""Per-record locks and writer tags, so that two sweeps into one ``--out`` never redo or destroy each other's work.

A sweep takes a record's lock (non-blocking) before it runs that record and keeps it until the record is written:

- the lock is an OS file lock (``fcntl.flock``; ``filelock`` where there is no ``fcntl``) on
  ``<out>/.locks/<suite>/<record stem>.lock``; the OS drops it when its process dies (SIGKILL included), so a lock
  is never stale. Lock files are empty, end in ``.lock`` (never ``.json``) and live in a hidden folder, so they are
  never taken for records; they are left in place (unlinking a lock file races with a sweep opening it).
- temporary files carry their writer's host and pid (``.<name>.<host>-<pid>.<random>.tmp``): a sweep removes the
  debris of a write killed mid-way only when that writer is dead (same host, no such process), or when it holds the
  record's lock itself; a file another live sweep is writing is never touched.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

LOCK_DIR = ".locks"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:40]


def writer_tag() -> str:
    """``<host>-<pid>``: who writes a temporary file (goes into its name)."""
    return f"{_host()}-{os.getpid()}"


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def tmp_owner_dead(tmp: Path) -> bool | None:
    """True if the temporary file's writer is known to be dead, False if it is (or may be) alive, None if the name
    carries no writer tag (written by an older version)."""
    m = _TMP.match(tmp.name)
    if not m:
        return None
    if m["host"] != _host():
        return False  # another machine's writer: cannot tell, leave it alone
    return not pid_alive(int(m["pid"]))


def tmp_target_name(tmp: Path) -> str | None:
    """The name of the file a temporary file was going to become (``.r.json.host-1.abc.tmp`` -> ``r.json``)."""
    m = _TMP.match(tmp.name)
    if m:
        return m["name"]
    if tmp.name.startswith(".") and tmp.name.endswith(".tmp"):  # legacy: .<name>.<random>.tmp
        return tmp.name[1:].rsplit(".", 2)[0] if tmp.name.count(".") >= 3 else None
    return None


def remove_dead_tmp(root: Path) -> list[Path]:
    """Remove temporary files under ``root`` whose writer is dead; returns them. Files of live (or unknown) writers
    stay."""
    removed = []
    if not Path(root).is_dir():
        return removed
    for tmp in Path(root).rglob(".*.tmp"):
        if tmp_owner_dead(tmp):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def remove_record_tmp(path: Path) -> list[Path]:
    """Remove the temporary files of one record whose writer is dead or unknown (legacy names). Call it only while
    holding that record's lock: then no live sweep of this version is writing it."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if tmp_target_name(tmp) == path.name and tmp_owner_dead(tmp) is not False:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def lock_path(out: Path, record: Path) -> Path:
    out, record = Path(out), Path(record)
    try:
        rel = record.resolve().relative_to(out.resolve())
    except ValueError:
        rel = Path(record.name)
    return out / LOCK_DIR / rel.parent / (rel.stem + ".lock")


class RecordLock:
    """A non-blocking, process-lifetime lock on one record of ``out``. ``acquire()`` is False when another live
    process holds it."""

    def __init__(self, out: Path, record: Path):
        self.path = lock_path(out, record)
        self._fd: int | None = None
        self._filelock = None

    def acquire(self) -> bool:
        if self._fd is not None or self._filelock is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            import filelock

            lk = filelock.FileLock(str(self.path), timeout=0)
            try:
                lk.acquire()
            except filelock.Timeout:
                return False
            self._filelock = lk
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._filelock is not None:  # pragma: no cover
            self._filelock.release()
            self._filelock = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def ensure_lock_dir(out: Path) -> Path:
    """``<out>/.locks/`` with a ``.gitignore`` so lock files never show up in ``git status`` of ``results/``."""
    d = Path(out) / LOCK_DIR
    d.mkdir(parents=True, exist_ok=True)
    gi = d / ".gitignore"
    if not gi.exists():
        try:
            gi.write_text("*\n")
        except OSError:
            pass
    return d
