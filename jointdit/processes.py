"""A run's processes: they die with their launcher, and one run at a time trains a run folder.

- `die_with_launcher`: a process started by a launcher (torchrun, accelerate launch, or
  `make final-train-*`, which names itself in JOINTDIT_LAUNCHER_PID) stops within a second of its
  parent or that launcher going away, SIGKILL included, instead of training on unseen and racing
  the next run.
- `run_lock`: an exclusive lock (flock) on `<run folder>/.run.lock`, holding the PID of the
  process that trains it. The kernel drops the lock when that process dies, so a lock left by
  a killed run is taken over; a live holder stops the second run with one line naming its PID.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from jointdit.errors import UserError

LAUNCHER_PID_VAR = "JOINTDIT_LAUNCHER_PID"
LOCK_NAME = ".run.lock"
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", LAUNCHER_PID_VAR)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def die_with_launcher(env: Mapping[str, str] | None = None, interval: float = 0.5) -> bool:
    """When a launcher started this process, watch it from a daemon thread and exit (code 1) as
    soon as the parent or the named launcher is gone. Returns whether a watch was started."""
    env = os.environ if env is None else env
    if not any(k in env for k in _LAUNCHER_ENV):
        return False  # started by hand: it may outlive its shell (nohup) as the user asked
    parent = os.getppid()
    launcher = int(env[LAUNCHER_PID_VAR]) if env.get(LAUNCHER_PID_VAR) else None

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or (launcher is not None and not running(launcher)):
                os._exit(1)  # checkpoints are written atomically: nothing half-done remains

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `<run_dir>/.run.lock` while the block runs; one line naming the holder if taken.
    On leaving, the lock file goes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{path}: another run (pid {holder}) is training {run_dir}; wait for it to "
                f"finish or stop it (kill {holder}), or use another run.name"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed that file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still locked: a newcomer that opened it will retry
        os.close(fd)
