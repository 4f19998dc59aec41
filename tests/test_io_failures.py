"""Issue 13, section 3: every `mepf` subcommand turns a failure of the environment (permission denied,
a read-only file system, a full disk, a file locked by another process) into one line that names the
path, what happened and what to do, and exits 2; a healthy file is never called corrupt; -v adds the
traceback. Nothing partial is written, and a refused release costs no budget when the failure can be
seen before the charge.

Before: `mepf inspect` of a healthy release that the user may not read, or that another process holds
open for writing, said `ReleaseCorruptError: ... is not a readable release file (PermissionError: ...)`;
a release into a read-only or unwritable folder was charged, then failed at the write; a full disk
ended `mepf release` in a traceback; `mepf budget` waited forever on a ledger lock held by a stopped
process.

How each failure is made: permission denied is real (the tests run as root, who may read anything, so
the command runs with the effective uid of `nobody` and gets the kernel's EACCES; as another user the
file modes alone deny it); a lock is real (another process holds the release open for writing with
h5py; the ledger's flock is held on another open file); a full disk is real as the kernel's file size
limit (RLIMIT_FSIZE, EFBIG) and injected as ENOSPC (the exact OSError h5py raises on a full disk, from
the release write inside the flow); a read-only file system is injected at `os.statvfs` / `os.open`
(making one needs a mount, which CI cannot be assumed to allow).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import pytest

# Everything the commands import lazily, imported now: as `nobody` the interpreter's own files may be unreadable.
import flows.custodian_release  # noqa: F401
import PIL.PngImagePlugin  # noqa: F401
import storage.datasets  # noqa: F401
import storage.ledger
import storage.signing  # noqa: F401
import tasks.custodian  # noqa: F401
from flows.cli import main
from mepf_core.errors import (DiskFullError, FileAccessError, FileLockedError, MepfError, NotWritableError,
                              PathExistsError, PathIsAFolderError, PathNotFoundError, PermissionDeniedError,
                              ReadOnlyFileSystemError, file_access_error)
from storage.release import read_release
from tasks.retries import is_transient
from tests.helpers import lattice_sums, write_image_folder
from tests.test_release_file import make_release

NOBODY = 65534
MISLEADING = ("corrupt", "tamper", "damaged", "not a readable", "not a valid")


@contextlib.contextmanager
def unprivileged():
    """Run as a user who owns none of the files: effective uid/gid `nobody` when root (root ignores
    file modes), restored after; as any other user the modes set by the test already deny access."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_dir():
    """A folder `nobody` may enter (pytest's tmp_path lies under a folder private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="mepf-io-"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    shutil.rmtree(folder)


def _run(capture, argv: list[str]) -> tuple[int, str, list[str]]:
    """main(argv); its exit status, stderr, and stderr's non-empty lines (capfd: Prefect's lines too)."""
    capture.readouterr()
    code = main(argv)
    err = capture.readouterr().err
    return code, err, [line for line in err.splitlines() if line.strip()]


def _one_line(lines: list[str], command: str, error: type) -> str:
    assert len(lines) == 1, lines
    prefix = f"mepf {command}: error: {error.__name__}: "
    assert lines[0].startswith(prefix), lines[0]
    assert not any(word in lines[0].lower() for word in MISLEADING), lines[0]
    return lines[0].removeprefix(prefix)


def _statvfs_with(monkeypatch, folder: Path, **changes) -> None:
    """os.statvfs reports `changes` (f_flag, f_bavail) for `folder`, the truth elsewhere."""
    real = os.statvfs
    fields = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail", "f_flag",
              "f_namemax")

    def statvfs(path):
        st = real(path)
        if Path(path).resolve() != folder.resolve():
            return st
        values = {name: getattr(st, name) for name in fields}
        values.update(changes)
        return os.statvfs_result(tuple(values[name] for name in fields))

    monkeypatch.setattr(os, "statvfs", statvfs)


def _release_args(data: Path, out: Path, ledger: Path) -> list[str]:
    return ["release", "--dataset", f"imagefolder:{data}", "--target-epsilon", "1", "--labelled", "--out", str(out),
            "--ledger", str(ledger), "--budget", "5", "--batch-size", "8"]


def _charges(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines() if '"charge"' in line]


# --- permission denied (real) -----------------------------------------------------------------------

def test_permission_denied_on_a_healthy_release_is_named_never_corrupt(open_dir, capfd):
    path = open_dir / "r.h5"
    make_release(path)
    path.chmod(0o000)
    with unprivileged():
        code, _, lines = _run(capfd, ["inspect", str(path)])
    assert code == 2
    assert _one_line(lines, "inspect", PermissionDeniedError).startswith(
        f"cannot read release file {path}: permission denied [EACCES]; give this user access (`ls -ld {path}`, "
        "then chmod/chown)")
    path.chmod(0o644)
    assert read_release(path).metadata.release_id  # the file was healthy all along


def test_verbose_shows_the_traceback_then_the_one_line(open_dir, capfd):
    path = open_dir / "r.h5"
    make_release(path)
    path.chmod(0o000)
    with unprivileged():
        code, err, lines = _run(capfd, ["-v", "inspect", str(path)])
    assert code == 2
    assert "Traceback (most recent call last)" in err and "PermissionError: [Errno 13]" in err  # the original
    assert lines[-1].startswith(f"mepf inspect: error: PermissionDeniedError: cannot read release file {path}: "
                                "permission denied [EACCES]")


def test_permission_denied_on_the_output_folder_refuses_the_release_before_any_charge(open_dir, capfd):
    data = write_image_folder(open_dir / "data")
    out_dir = open_dir / "out"
    out_dir.mkdir(mode=0o555)
    out_dir.chmod(0o555)
    ledger = open_dir / "ledger.jsonl"
    ledger.write_text("")
    with unprivileged():
        code, _, lines = _run(capfd, _release_args(data, out_dir / "r.h5", ledger))
    assert code == 2
    assert _one_line(lines, "release", NotWritableError).startswith(
        f"cannot create files in output folder {out_dir}: permission denied [EACCES]")
    assert ledger.read_bytes() == b"" and list(out_dir.iterdir()) == []


def test_permission_denied_on_a_ledger_and_a_key_folder(open_dir, capfd):
    ledger = open_dir / "ledger.jsonl"
    ledger.write_text('{"dataset_id": "x", "kind": "budget", "epsilon": 1.0, "delta": 1e-05}\n')
    ledger.chmod(0o000)
    keys = open_dir / "keys"
    keys.mkdir()
    keys.chmod(0o555)
    with unprivileged():
        code, _, lines = _run(capfd, ["budget", "--ledger", str(ledger)])
        key_code, _, key_lines = _run(capfd, ["keygen", "--out", str(keys / "custodian.key")])
    assert code == 2
    assert _one_line(lines, "budget", PermissionDeniedError).startswith(
        f"cannot read ledger {ledger}: permission denied [EACCES]")
    assert key_code == 2
    assert _one_line(key_lines, "keygen", PermissionDeniedError).startswith(
        f"cannot access {keys / 'custodian.key'}: permission denied [EACCES]")
    assert list(keys.iterdir()) == []


# --- read-only file system (injected at the OS boundary) ---------------------------------------------

def test_read_only_file_system_refuses_the_release_before_any_charge(tmp_path, capfd, monkeypatch):
    data = write_image_folder(tmp_path / "data")
    out_dir, ledger = tmp_path / "mnt", tmp_path / "ledger.jsonl"
    out_dir.mkdir()
    ledger.write_text("")
    _statvfs_with(monkeypatch, out_dir, f_flag=os.statvfs(out_dir).f_flag | os.ST_RDONLY)
    code, _, lines = _run(capfd, _release_args(data, out_dir / "r.h5", ledger))
    assert code == 2
    assert _one_line(lines, "release", ReadOnlyFileSystemError) == (
        f"cannot create files in output folder {out_dir}: the file system is mounted read-only [EROFS]; write to a "
        "folder on a writable file system (choose another output path) or remount it read-write")
    assert ledger.read_bytes() == b"" and list(out_dir.iterdir()) == []


def test_read_only_file_system_met_by_a_write_is_one_line(tmp_path, capfd, monkeypatch):
    """A file system remounted read-only under a command: the OSError of the open is named, not a traceback."""
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code, _, lines = _run(capfd, ["keygen", "--out", str(tmp_path / "custodian.key")])
    assert code == 2
    assert _one_line(lines, "keygen", ReadOnlyFileSystemError) == (
        f"cannot access {tmp_path / 'custodian.key'}: the file system is mounted read-only [EROFS]; write to a "
        "folder on a writable file system (choose another output path) or remount it read-write")
    assert list(tmp_path.iterdir()) == []


# --- disk full ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE: the kernel refuses to grow any file of this process past `nbytes` (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_file_that_does_not_fit_is_one_line_and_leaves_no_partial_file(tmp_path, capsys):
    """Real: the kernel refuses the write (EFBIG); the key written in part is removed, the release's
    temporary file too. (capsys: pytest's fd capture writes to a file, which the limit would cut.)"""
    with file_size_limit(64):  # a PEM private key is 119 bytes
        code, _, lines = _run(capsys, ["keygen", "--out", str(tmp_path / "custodian.key")])
        with pytest.raises(DiskFullError, match=rf"^writing {tmp_path / 'r.h5'} failed, nothing was written: the "
                                                r"file is larger than the file system or `ulimit -f` allows \[EFBIG\]"):
            make_release(tmp_path / "r.h5")
    assert code == 2
    assert _one_line(lines, "keygen", DiskFullError).startswith(
        f"cannot access {tmp_path / 'custodian.key'}: the file is larger than the file system or `ulimit -f` "
        "allows [EFBIG]")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def prefect_console_to_capsys(capsys):
    """Prefect's console handler writes to the stderr it found when Prefect was imported: point it at
    this test's capture, so that the test sees every line a user would."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    previous = [h.setStream(sys.stderr) for h in handlers]
    yield capsys
    for h, stream in zip(handlers, previous):
        h.stream = stream  # not setStream: it would flush the capture, closed by now


def test_disk_full_during_the_release_write_leaves_no_release_and_keeps_the_charge(tmp_path, prefect_console_to_capsys,
                                                                                  monkeypatch):
    """The whole `mepf release` (Prefect flow): the disk fills while h5py writes the release. Prefect's
    console records of the failure (its traceback, "Finished in state Failed(...)") are not shown: the
    command's one line says it (-v shows them)."""
    data = write_image_folder(tmp_path / "data")
    out, ledger = tmp_path / "out" / "r.h5", tmp_path / "ledger.jsonl"
    out.parent.mkdir()

    def disk_full(self, name, *args, **kwargs):  # what h5py raises when the device is full (h5py 3.16, HDF5 2.0)
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Mon Nov 30 18:25:42 "
                                    f"2026\n, filename = '{self.file.filename}', file descriptor = 3, errno = 28, "
                                    "error message = 'No space left on device', buf = 0x7f3086f4b810, total write "
                                    "size = 736512, bytes this sub-write = 736512, offset = 65536)")

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    code, _, lines = _run(prefect_console_to_capsys, _release_args(data, out, ledger))
    lines = [line for line in lines if not line.startswith("extract shard")]  # the extraction's progress bar
    assert code == 2
    [charge] = _charges(ledger)
    assert _one_line(lines, "release", DiskFullError) == (
        f"writing {out} failed, nothing was written: no space left on the device [ENOSPC]; free space there "
        f"(`df -h {out.parent}`) or write to another file system, then run again; release {charge['release_id']} "
        f"stays charged in the ledger {ledger} (spent budget is never under-counted, a new release is charged again)")
    assert list(out.parent.iterdir()) == []  # neither the release nor its temporary file


def test_a_disk_without_room_for_the_release_refuses_it_before_the_charge(tmp_path, monkeypatch):
    """The custodian's task (as in test_release_file): free space is checked against the release's size
    before the ledger is charged."""
    from prefect.logging import disable_run_logger

    from storage.params import ReleaseParams
    from tasks.custodian import calibrate, charge_noise_and_release, check_budget
    from tests.test_release_file import D, K, np

    meta, _ = make_release(tmp_path / "other.h5")
    out, ledger = tmp_path / "out" / "r.h5", tmp_path / "ledger.jsonl"
    out.parent.mkdir()
    _statvfs_with(monkeypatch, out.parent, f_bavail=0)
    params = ReleaseParams(target_epsilon=1.0, out=str(out), ledger=str(ledger), budget=5.0, dataset_id="ds",
                           labelled=True, moments=2)
    sums = lattice_sums(np.zeros((K, D)), np.zeros((K, D)), np.full(K, 30.0))
    info = {"class_names": ("a", "b", "c"), "image_shape": (1, 28, 28), "encoder": meta.encoder}
    with disable_run_logger():
        mech = calibrate.fn(params)
        check_budget.fn(params, mech)
        with pytest.raises(DiskFullError, match=rf"^release {out} needs about 1\.0 MiB but its folder {out.parent} "
                                                r"has 0\.0 MiB free: no space left on the device \[ENOSPC\]; .* "
                                                r"\(nothing was written or charged\)$"):
            charge_noise_and_release.fn(params, mech, sums, info)
    assert _charges(ledger) == [] and list(out.parent.iterdir()) == []


# --- locked by another process (real) ----------------------------------------------------------------

def test_a_release_held_open_by_a_writer_is_locked_not_corrupt(tmp_path, capfd):
    path = tmp_path / "r.h5"
    make_release(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
                               "sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        code, _, lines = _run(capfd, ["inspect", str(path)])
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert code == 2
    assert _one_line(lines, "inspect", FileLockedError) == (
        f"cannot read release file {path}: it is locked by another process (which has it open for writing) "
        f"[EAGAIN]; wait for that process to finish or close the file (`fuser -v {path}` names it), then run again; "
        "HDF5_USE_FILE_LOCKING=FALSE turns HDF5's lock off, safe only where nothing can write the file meanwhile "
        "(a read-only share)")
    assert _run(capfd, ["inspect", str(path)])[0] == 0  # the writer is gone: the same file reads


def test_a_ledger_locked_too_long_is_one_line_not_a_hang(tmp_path, capfd, monkeypatch):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"dataset_id": "x", "kind": "budget", "epsilon": 1.0, "delta": 1e-05}\n')
    monkeypatch.setattr(storage.ledger, "LOCK_TIMEOUT_SECONDS", 0.3)
    with open(ledger, "rb") as holder:  # another open file: flock conflicts as with another process
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        code, _, lines = _run(capfd, ["budget", "--ledger", str(ledger)])
    assert code == 2
    assert _one_line(lines, "budget", FileLockedError) == (
        f"ledger {ledger} is locked by another process (a release or `mepf budget` that holds it for more than 0.3 s "
        f"is stuck or stopped) [EAGAIN]; let that process finish or end it (`fuser -v {ledger}` names it), then run "
        "again")
    assert _run(capfd, ["budget", "--ledger", str(ledger)])[0] == 0  # released: it reads


# --- the mapping itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("code, error, transient", [
    (errno.EACCES, PermissionDeniedError, False), (errno.EPERM, PermissionDeniedError, False),
    (errno.EROFS, ReadOnlyFileSystemError, False), (errno.ENOSPC, DiskFullError, True),
    (errno.EDQUOT, DiskFullError, True), (errno.EAGAIN, FileLockedError, True),
    (errno.ENOENT, PathNotFoundError, False), (errno.EISDIR, PathIsAFolderError, False),
    (errno.EEXIST, PathExistsError, False), (errno.EIO, FileAccessError, True),
])
def test_each_errno_of_the_environment_is_a_named_user_error(code, error, transient):
    exc = OSError(code, "Unable to lock file" if code == errno.EAGAIN else os.strerror(code), "/data/r.h5")
    mapped = file_access_error(exc, "cannot read /data/r.h5")
    assert type(mapped) is error and isinstance(mapped, MepfError) and isinstance(mapped, OSError)
    assert str(mapped).startswith(f"cannot read /data/r.h5: ") and f"[{errno.errorcode[code]}]; " in str(mapped)
    assert mapped.errno == code and mapped.path == "/data/r.h5"
    assert is_transient(mapped) is transient  # tasks.retries retries a full disk, never a permission


@pytest.mark.parametrize("exc", [
    OSError("Unable to synchronously open file (truncated file: eof = 96, stored_eof = 2048)"),  # damage: no errno
    OSError(errno.EINVAL, "Invalid argument"),  # a bug's error, not the environment's
    OSError(errno.EAGAIN, "Resource temporarily unavailable"),  # not about a lock
])
def test_an_os_error_that_is_not_the_environment_is_not_mapped(exc):
    assert file_access_error(exc) is None


def test_prefect_console_records_repeating_a_user_error_are_dropped_unless_verbose(monkeypatch):
    """What `mepf` shows of Prefect's console records when a task fails (flows.cli_common)."""
    import flows.cli_common as common

    def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, None, exc_info)

    full = DiskFullError("writing /out/r.h5 failed, nothing was written: no space left on the device [ENOSPC]")
    bug = KeyError("moment3")
    retry = record(f"Task run failed with exception: {full!r} - Retry 1/2 will start 10 second(s) from now", full)
    monkeypatch.setattr(common, "VERBOSE", False)
    quiet = common._UserErrorTracebacks()
    assert not quiet.filter(record(f"Task run failed with exception: {full!r} - Retries are exhausted", full))
    assert not quiet.filter(record(f"Finished in state Failed('Task run encountered an exception DiskFullError: "
                                   f"{full}')"))
    assert quiet.filter(retry) and retry.exc_info is None  # the retry is announced, without its traceback
    assert quiet.filter(record(f"Task run failed with exception: {bug!r}", bug))  # a bug keeps its traceback
    assert quiet.filter(record("Finished in state Failed('Task run encountered an exception KeyError: 'moment3'')"))
    monkeypatch.setattr(common, "VERBOSE", True)
    assert common._UserErrorTracebacks().filter(record(f"Task run failed with exception: {full!r}", full))
