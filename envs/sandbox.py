"""Run untrusted (model-written) Python programs in a separate, contained process.

Each run gets:
- its own process, never the caller's: `bwrap` (Debian package `bubblewrap`) starts it in new user, PID, network,
  mount, IPC and UTS namespaces;
- no network: the new network namespace has only a loopback device of its own;
- a fresh host temporary directory as working directory (`/tmp/sandbox` inside), removed afterwards; `/tmp` is a
  small private tmpfs; the rest of the file system is mounted read-only;
- a scrubbed environment (nothing inherited from the caller);
- limits on CPU time, memory (address space), processes, file size (rlimits set inside the namespace), wall time
  and output size (enforced by the caller, which kills the run).

When the caller is root the sandbox runs as `nobody`: a user namespace mapped to host root would bypass the process
limit and could read root-only files. When the run ends, for any reason, the whole process tree dies with it: the
PID namespace is torn down when its first process exits, and that process dies with `bwrap`, which is killed.

Where `bwrap` is missing or user namespaces are not allowed, `run_program` raises `SandboxUnavailable` unless the
caller opts in to running without isolation (`allow_unisolated=True` or `HYBRID_ALIGN_ALLOW_UNISOLATED=1`); such
results say so in `notes` and have `isolated=False`.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

ALLOW_UNISOLATED_ENV = "HYBRID_ALIGN_ALLOW_UNISOLATED"
SANDBOX_UID = 65534  # nobody; used only when the caller is root
INNER_WORKDIR = "/tmp/sandbox"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """Raised when the OS cannot isolate a run and the caller did not opt in to running without isolation."""


class SandboxStatus(str, Enum):
    """How a run ended. Exactly one applies; limits are checked before the exit code."""

    OK = "ok"  # exited with code 0
    ERROR = "error"  # exited non-zero or died from a signal it caused (exception, failed assert, crash)
    TIMEOUT = "timeout"  # still running at the wall-clock limit
    CPU_LIMIT = "cpu_limit"  # used its CPU-time limit
    MEMORY_LIMIT = "memory_limit"  # could not allocate memory under the address-space limit
    OUTPUT_LIMIT = "output_limit"  # wrote more than max_output_bytes to stdout and stderr together


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run."""

    wall_s: float = 10.0  # wall-clock seconds before the run is killed
    cpu_s: int = 5  # CPU seconds (all threads of a process); SIGXCPU then
    memory_mb: int = 1024  # address space per process; allocation beyond it fails
    max_processes: int = 32  # processes and threads alive at once inside the sandbox
    max_output_bytes: int = 1 << 20  # stdout + stderr kept; the run is killed beyond it
    max_file_mb: int = 16  # largest file the program may write, and the size of its private /tmp
    max_open_files: int = 64  # file descriptors per process


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run. `returncode` follows subprocess: negative -N when the program died from signal N."""

    status: SandboxStatus
    stdout: str
    stderr: str
    returncode: int | None  # None when the sandbox killed the run (timeout, output limit)
    duration_s: float
    isolated: bool  # True when namespaces (network, PID, mount) contained the run
    notes: tuple[str, ...] = ()  # how the run was contained, and what was not
    workdir: str = ""  # host path of the temporary working directory (already removed)

    @property
    def ok(self) -> bool:
        return self.status is SandboxStatus.OK


@dataclass
class Sandbox:
    """Runs programs with `bwrap`. Checks once, on first use, that isolation works on this machine.

    bwrap: path of the `bwrap` binary; None looks it up on PATH.
    python: interpreter for the programs; None picks the caller's interpreter when the sandbox user can run it, else
        the system `python3` (root's interpreter under a 0700 home is not readable by `nobody`).
    allow_unisolated: when isolation is unavailable, run anyway in a plain child process (limits still apply, but
        the network is reachable, the file system is only protected by permissions, and processes that leave the
        process group are not killed). Off by default: the sandbox refuses and says why.
    """

    bwrap: str | None = None
    python: str | None = None
    allow_unisolated: bool = False
    _probe: tuple[bool, str, str] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def run(self, code: str, stdin: str | None = None, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
        """Run the Python program `code` with `stdin` as its standard input."""
        isolated, python, reason = self._check()
        notes: list[str] = []
        if isolated:
            notes += ["bwrap: user, pid, net, mount, ipc and uts namespaces", "network: isolated (loopback only)",
                      "file system: read-only except the working directory and a private /tmp"]
        else:
            if not self.allow_unisolated:
                raise SandboxUnavailable(_refusal_message(reason))
            logger.warning("running model-written code WITHOUT isolation: %s", reason)
            notes += [f"UNISOLATED: {reason}", "network: NOT isolated", "file system: NOT read-only",
                      "processes that leave the process group are not killed",
                      "process limit: counted per user, shared with other unisolated runs"]
        notes.append(f"python: {python}")

        workdir = tempfile.mkdtemp(prefix="hybrid-align-sandbox-")
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            if os.geteuid() == 0:
                os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
            # stdin from an anonymous file: no writer thread, no pipe deadlock, nothing the program can find.
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write((stdin or "").encode("utf-8"))
                stdin_file.seek(0)
                result = _supervise(self._argv(isolated, python, workdir, limits), stdin_file, isolated, workdir, limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        status, stdout, stderr, returncode, duration = result
        return SandboxResult(status, stdout, stderr, returncode, duration, isolated, tuple(notes), workdir)

    def _argv(self, isolated: bool, python: str, workdir: str, limits: SandboxLimits) -> list[str]:
        # rlimits are set by prlimit inside the user namespace: RLIMIT_NPROC then counts this run's processes only.
        mb = 1 << 20
        inner = [
            shutil.which("prlimit", path=SYSTEM_PATH) or "prlimit",
            f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--as={limits.memory_mb * mb}",
            f"--nproc={limits.max_processes}",
            f"--fsize={limits.max_file_mb * mb}",
            f"--nofile={limits.max_open_files}",
            "--core=0",
            "--",
            python, "-I", "-B", "main.py",
        ]
        if not isolated:
            return inner
        env = _sandbox_env(home=INNER_WORKDIR)
        return [
            self._bwrap_path() or "bwrap",
            "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--size", str(limits.max_file_mb * mb), "--tmpfs", "/tmp",
            "--bind", workdir, INNER_WORKDIR,
            "--chdir", INNER_WORKDIR,
            "--clearenv",
            *[arg for key, value in env.items() for arg in ("--setenv", key, value)],
            "--",
            *inner,
        ]

    def _bwrap_path(self) -> str | None:
        return shutil.which(self.bwrap or "bwrap")

    def _check(self) -> tuple[bool, str, str]:
        """(isolated, python, reason it is not isolated). Probed once per Sandbox."""
        with self._lock:
            if self._probe is None:
                self._probe = self._run_probe()
            return self._probe

    def _run_probe(self) -> tuple[bool, str, str]:
        bwrap = self._bwrap_path()
        base = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--clearenv", "--"]
        if bwrap is None:
            isolated, reason = False, f"{self.bwrap or 'bwrap'} not found (install the Debian package `bubblewrap`)"
        else:
            probe = _probe_run([*base, "/bin/true"])
            isolated = probe.returncode == 0
            reason = "" if isolated else f"bwrap cannot create namespaces here: {probe.stderr.strip()}"
        failures = []
        for python in [self.python] if self.python else _python_candidates():
            argv = [python, "-I", "-c", "import socket"]
            probe = _probe_run([*base, *argv] if isolated else argv)
            if probe.returncode == 0:
                return isolated, python, reason
            failures.append(f"{python}: {probe.stderr.strip() or f'exit {probe.returncode}'}")
        raise SandboxUnavailable("no Python interpreter the sandbox user can run: " + "; ".join(failures))


def _probe_run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=_sandbox_env(home="/"),
                              cwd="/", **_user_kwargs())
    except OSError as e:  # e.g. the binary is not executable
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def run_program(
    code: str,
    stdin: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    *,
    allow_unisolated: bool | None = None,
) -> SandboxResult:
    """Run the Python program `code` in the default sandbox. See `Sandbox` and the module docstring.

    allow_unisolated: None reads HYBRID_ALIGN_ALLOW_UNISOLATED ("1" opts in).
    """
    if allow_unisolated is None:
        allow_unisolated = os.environ.get(ALLOW_UNISOLATED_ENV, "") == "1"
    return _default_sandbox(allow_unisolated).run(code, stdin, limits)


_DEFAULT_SANDBOXES: dict[bool, Sandbox] = {}


def _default_sandbox(allow_unisolated: bool) -> Sandbox:
    return _DEFAULT_SANDBOXES.setdefault(allow_unisolated, Sandbox(allow_unisolated=allow_unisolated))


def _refusal_message(reason: str) -> str:
    return (
        f"Sandbox isolation is unavailable: {reason}. Model-written code would run with network access and a "
        "writable file system, so it is refused. Install bubblewrap (`apt-get install -y bubblewrap`) and allow "
        "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or the AppArmor userns "
        f"restriction off), or opt in to unisolated runs with allow_unisolated=True or {ALLOW_UNISOLATED_ENV}=1."
    )


def _python_candidates() -> list[str]:
    system = shutil.which("python3", path=SYSTEM_PATH)
    return [sys.executable] + ([system] if system and system != sys.executable else [])


def _user_kwargs() -> dict:
    """Popen arguments that drop root to `nobody` (see the module docstring)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _sandbox_env(home: str, tmpdir: str = "/tmp") -> dict[str, str]:
    # One-thread math libraries keep a program's address space (and so the memory limit) predictable.
    return {"PATH": SYSTEM_PATH, "HOME": home, "TMPDIR": tmpdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _supervise(
    argv: list[str], stdin_file, isolated: bool, workdir: str, limits: SandboxLimits
) -> tuple[SandboxStatus, str, str, int | None, float]:
    """Start argv in a new session, collect output under the limits, then kill the whole process group."""
    start = time.monotonic()
    deadline = start + limits.wall_s
    # bwrap writes {"child-pid": N} to the info pipe: N is the sandbox's PID 1 as the host sees it.
    info_read, info_write = os.pipe() if isolated else (-1, -1)
    if isolated:
        argv = [argv[0], "--info-fd", str(info_write), *argv[1:]]
    try:
        proc = subprocess.Popen(
            argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=None if isolated else workdir,
            env=_sandbox_env(home="/") if isolated else _sandbox_env(home=workdir, tmpdir=workdir),
            start_new_session=True, pass_fds=(info_write,) if isolated else (), **_user_kwargs(),
        )
    except BaseException:
        if isolated:
            os.close(info_read)
        raise
    finally:
        if isolated:
            os.close(info_write)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: [], info_read: []}
    total, killed_for = 0, None
    init_pid, namespace = None, None  # the sandbox's PID 1 as the host sees it, and its PID namespace
    with selectors.DefaultSelector() as selector:
        for fd in (out_fd, err_fd, info_read) if isolated else (out_fd, err_fd):
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and killed_for is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = SandboxStatus.TIMEOUT
                break
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                if key.fd == info_read:
                    chunks[info_read].append(data)
                    if init_pid is None:
                        init_pid = _sandbox_init_pid(b"".join(chunks[info_read]))
                        namespace = _pid_namespace(init_pid)
                    continue
                chunks[key.fd].append(data[: max(0, limits.max_output_bytes - total)])
                total += len(data)
                if total > limits.max_output_bytes:
                    killed_for = SandboxStatus.OUTPUT_LIMIT
                    break
    if isolated:
        os.close(info_read)
    if killed_for is None:
        # Output closed, but the program may still run (it can close stdout): the wall limit still applies.
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed_for = SandboxStatus.TIMEOUT
    if killed_for is not None:
        _kill(proc, init_pid)
    _kill_group(proc)  # unisolated runs: children still in the group
    proc.wait()
    if namespace:
        _empty_namespace(namespace)
    duration = time.monotonic() - start
    proc.stdout.close()
    proc.stderr.close()
    stdout = b"".join(chunks[out_fd]).decode("utf-8", "replace")
    stderr = b"".join(chunks[err_fd]).decode("utf-8", "replace")
    if killed_for is not None:
        return killed_for, stdout, stderr, None, duration
    returncode = proc.returncode
    if isolated and returncode > 128:
        returncode = -(returncode - 128)  # bwrap reports death by signal N as exit code 128 + N
    return _classify(returncode, stderr), stdout, stderr, returncode, duration


def _sandbox_init_pid(info: bytes) -> int | None:
    try:
        return int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _pid_namespace(pid: int | None) -> str | None:
    """The PID namespace of a live process (e.g. 'pid:[4026532512]'), None if it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") if pid else None
    except OSError:
        return None


def _empty_namespace(namespace: str, timeout_s: float = 5.0) -> None:
    """Kill whatever is still in the sandbox's PID namespace and wait until those processes are gone.

    The kernel kills the namespace when its PID 1 exits, but bwrap returns when the program exits, not when that
    PID 1 has finished: under load a forked child was seen still running after bwrap had gone. The run is over when
    nothing in the namespace has yet to exit (the PID 1 itself stays a zombie until the host reaps it).
    """
    seen: set[str] = set()  # "pid starttime", so a reused pid is not waited for
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            key = _process_key(entry)
            if key and (key in seen or _pid_namespace(int(entry)) == namespace):
                seen.add(key)
                alive.append(int(entry))
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not alive:
            return
        time.sleep(0.005)


def _process_key(pid: str) -> str | None:
    """'pid starttime' of a process that has not exited yet; None for a zombie (dead, waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else f"{pid} {fields[19]}"  # fields 3 (state) and 22 (start time)


def _kill(proc: subprocess.Popen, init_pid: int | None) -> None:
    """End a run that is still going, and return only once every process of it is gone.

    Killing the sandbox's PID 1 makes the kernel kill everything else in its PID namespace; `_empty_namespace`
    then waits until those processes have exited.
    """
    if init_pid is not None:
        try:
            os.kill(init_pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
    _kill_group(proc)  # bwrap dies; --die-with-parent then takes the sandbox's PID 1, and with it the rest


def _kill_group(proc: subprocess.Popen) -> None:
    # The group id is the leader's pid; a group outlives its leader while members remain, and its id is not
    # given to a new process while the group exists.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int, stderr: str) -> SandboxStatus:
    if returncode == 0:
        return SandboxStatus.OK
    if returncode == -signal.SIGXCPU:  # the CPU rlimit's soft limit; SIGKILL follows at the hard one
        return SandboxStatus.CPU_LIMIT
    last_line = (stderr.strip().splitlines() or [""])[-1]
    if last_line.startswith("MemoryError") or "cannot allocate memory" in stderr.lower():
        return SandboxStatus.MEMORY_LIMIT
    return SandboxStatus.ERROR
