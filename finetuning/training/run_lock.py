"""One run per output folder: a lock file, OUTPUT_DIR/.run.lock, held for the run's whole life.

Two runs writing into one folder mix their checkpoints, adapters and tokenizers without a word (issue 24: a QLoRA and
a GaLore smoke run started together left a QLoRA adapter beside the other run's tokenizer). So a run takes the folder
before anything loads (training/settings.check; export_gguf.py takes its run folder too), and a second run is refused
with one message that names the holder: its process id, host, command and start time.

- **Held** with an exclusive `flock` on the open lock file, which the kernel drops whenever the process ends, a kill
  -9 included. A lock file whose `flock` can be taken is therefore stale (its run is gone): it is taken over with one
  log line. Where the file system has no locks (some network and FUSE mounts), the recorded process id is asked
  instead: on this host, a process id that is not alive is a stale lock.
- **Released** on every exit: when main() returns or raises (interruptions.whole_run), and at exit (atexit); a signal
  that ends the process without Python's exit leaves a file that the next run finds stale.
- **Several processes of one run** (torchrun, accelerate launch: WORLD_SIZE > 1) share it: the process that writes
  the run's outputs takes it (rank 0, or each host's local rank 0 under --save_on_each_node); where it is refused,
  the launcher stops the others. Processes of one launch are told by the launcher's run id (TORCHELASTIC_RUN_ID) and
  rendezvous address (MASTER_ADDR:MASTER_PORT), which the lock records.
- A dry run writes nothing and takes no lock.

Standard library only (export_gguf.py imports it without the training libraries).
"""
from __future__ import annotations

import atexit
import datetime
import errno
import json
import logging
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: the recorded process id alone tells a stale lock
    fcntl = None

from cli.errors import UserInputError

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"

# The locks this process holds, by resolved folder: released by release_all (main's end, atexit).
_held: dict = {}


@dataclass
class Holder:
    """What a lock file says about the run that holds it."""

    pid: int
    host: str
    command: str
    started: str
    launch: str  # the launcher's run id and rendezvous address; "" for plain python

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started}: {self.command}"


def launch_id() -> str:
    """Who launched this process: the same for every process of one torchrun/accelerate launch; "" without one."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return ""
    return (f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}|{os.environ.get('MASTER_ADDR', '')}:"
            f"{os.environ.get('MASTER_PORT', '')}")


def takes_lock(save_on_each_node: bool = False) -> bool:
    """Whether this process takes the lock: the one that writes the run's outputs (known from the launcher's
    environment, before any process group exists)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    rank = "LOCAL_RANK" if save_on_each_node else "RANK"
    return int(os.environ.get(rank, "0") or 0) == 0


def _this_command() -> str:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return shlex.join(argv)[:500]


def _read(path: Path) -> Optional[Holder]:
    """The holder a lock file names; None where it is empty or unreadable (being written, or cut off)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(values["pid"]), str(values["host"]), str(values.get("command", "?")),
                      str(values.get("started", "?")), str(values.get("launch", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _try_flock(fd: int, exclusive: bool = True) -> Optional[bool]:
    """True: locked now; False: another process holds it; None: this file system has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no locks here


def _alive_by_pid(holder: Optional[Holder]) -> bool:
    """Without file locks: a holder on this host is alive if its process is; one on another host cannot be asked,
    and is taken for alive (deleting the lock file is the way out, and the message says so)."""
    if holder is None:
        return False
    if holder.host != socket.gethostname():
        return True
    return holder.pid != os.getpid() and _pid_alive(holder.pid)


def _refusal(folder: Path, holder: Optional[Holder], what: str) -> UserInputError:
    who = holder.describe() if holder is not None else "a process whose lock file cannot be read yet"
    return UserInputError(
        f"{what} {folder} is in use by another run: {who}. Two runs in one folder mix their checkpoints and models. "
        "Wait for it to end or stop it, or choose another folder. If that run is gone (on another machine sharing "
        f"this folder), delete {folder / LOCK_NAME}."
    )


class RunLock:
    """An output folder held by this process (`take`); `release` gives it back."""

    def __init__(self, folder: Path, fd: int, created_folder: bool):
        self.folder, self.fd, self.created_folder = folder, fd, created_folder

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self) -> None:
        if self.fd is None:
            return
        _held.pop(str(self.folder.resolve()), None)
        holder = _read(self.path)
        try:
            if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None
        if self.created_folder:
            try:
                self.folder.rmdir()  # made for the lock alone: a run refused early leaves no empty folder
            except OSError:
                pass


def _open_and_lock(path: Path) -> tuple:
    """The lock file opened, and _try_flock's answer. Where a run releasing the lock unlinked the file between our
    open and our flock, the flock is on a file no longer at the path: open the one there now (so that two runs never
    hold two files of one name)."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _try_flock(fd)
        try:
            if not locked or os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, locked
        except FileNotFoundError:
            pass
        os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return fd, _try_flock(fd)


def take(folder, what: str = "--output_dir", save_on_each_node: bool = False) -> Optional[RunLock]:
    """Hold `folder` for this run; refuse (UserInputError naming the holder) where another run holds it. Returns
    None on the processes of a launch that do not take it (takes_lock). `what` names the folder in messages."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:  # an earlier main() of this process (a notebook, a test) that was not released
        _held[key].release()
    if not takes_lock(save_on_each_node):
        return None  # the writing process decides for the launch (a check here would race with its own)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd, locked = _open_and_lock(path)
    try:
        holder = _read(path)
        if locked is False or (locked is None and _alive_by_pid(holder)):
            if holder is not None and holder.launch and holder.launch == launch_id():
                os.close(fd)  # another host's writer of this same launch (--save_on_each_node, a shared folder)
                return None
            raise _refusal(folder, holder, what)
        if holder is not None and not (holder.pid == os.getpid() and holder.host == socket.gethostname()):
            logger.warning("Taking over %s: the run that held it (%s) is no longer running.", path, holder.describe())
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _this_command(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "launch": launch_id()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except BaseException:
        os.close(fd)
        if created:
            try:
                path.unlink(missing_ok=True)
                folder.rmdir()
            except OSError:
                pass
        raise
    lock = RunLock(folder, fd, created)
    _held[key] = lock
    return lock


def release_all() -> None:
    """Give back every folder this process holds (main's end, atexit)."""
    for lock in list(_held.values()):
        try:
            lock.release()
        except OSError as e:  # a folder deleted under the run: nothing left to release
            logger.debug("Releasing %s: %s", lock.path, e)


atexit.register(release_all)
