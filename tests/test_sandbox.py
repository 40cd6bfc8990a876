"""The sandbox contains real hostile programs, reports each with a clear status, and leaves no process behind."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from envs.sandbox import Sandbox, SandboxLimits, SandboxStatus, SandboxUnavailable, run_program

ISOLATED, _, REASON = Sandbox()._check()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"sandbox isolation unavailable here: {REASON}")

# Programs that should end by themselves get a generous wall limit: the machine may be busy with other work.
LIMITS = SandboxLimits(wall_s=10.0, cpu_s=1, memory_mb=256, max_processes=16, max_output_bytes=64_000)


def _marker() -> str:
    return "hasb" + secrets.token_hex(5)  # /proc/<pid>/comm keeps 15 characters


def _processes_named(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == marker:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def run_marked(body: str, limits: SandboxLimits = LIMITS, stdin: str | None = None):
    """Run `body` after naming the process (inherited by forks) so leftovers can be found on the host."""
    marker = _marker()
    code = f"import os\nopen('/proc/self/comm', 'w').write({marker!r})\n" + body
    result = run_program(code, stdin=stdin, limits=limits)
    assert _processes_named(marker) == [], "a sandboxed process outlived its run"
    assert not os.path.exists(result.workdir), "the temporary working directory was not removed"
    return result


@needs_isolation
def test_correct_program_runs_with_stdin_in_an_isolated_fresh_workdir():
    result = run_marked("import sys\nprint(sorted(os.listdir('.')), sys.stdin.read().upper())", stdin="abc")
    assert result.status is SandboxStatus.OK and result.returncode == 0
    assert result.stdout == "['main.py'] ABC\n"
    assert result.isolated and any("network: isolated" in n for n in result.notes)


@needs_isolation
def test_program_error_is_reported_with_its_traceback():
    result = run_marked("raise ValueError('bad input')")
    assert result.status is SandboxStatus.ERROR and result.returncode == 1
    assert "ValueError: bad input" in result.stderr


@needs_isolation
def test_infinite_loop_hits_the_cpu_limit():
    result = run_marked("while True:\n    pass\n")
    assert result.status is SandboxStatus.CPU_LIMIT
    assert result.returncode == -signal.SIGXCPU


@needs_isolation
def test_sleeping_past_the_wall_limit_is_killed():
    limits = SandboxLimits(wall_s=1.0)
    result = run_marked("import time\nprint('started', flush=True)\ntime.sleep(60)\n", limits)
    assert result.status is SandboxStatus.TIMEOUT and result.returncode is None
    assert result.stdout == "started\n"
    assert 1.0 <= result.duration_s < 5.0


@needs_isolation
def test_fork_bomb_is_contained():
    body = "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_marked(body, SandboxLimits(wall_s=1.5, cpu_s=5, max_processes=16))
    assert result.status in (SandboxStatus.TIMEOUT, SandboxStatus.CPU_LIMIT)


@needs_isolation
def test_process_limit_refuses_forks_beyond_it():
    body = (
        "import time\nn = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    result = run_marked(body, SandboxLimits(wall_s=10, max_processes=12))
    forks, errno = map(int, result.stdout.split())
    assert result.status is SandboxStatus.OK
    assert 0 < forks < 12 and errno == 11  # EAGAIN
    # The sleeping children died with the sandbox (run_marked checked it) instead of sleeping 30 s.


@needs_isolation
def test_daemonised_grandchild_dies_with_the_run():
    body = "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent exits')\n"
    result = run_marked(body)
    assert result.status is SandboxStatus.OK and result.stdout == "parent exits\n"


@pytest.mark.parametrize("body", ["x = bytearray(8 * 2**30)\n", "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)\n"])
@needs_isolation
def test_memory_hog_hits_the_memory_limit(body):
    result = run_marked(body, SandboxLimits(wall_s=10, memory_mb=256))
    assert result.status is SandboxStatus.MEMORY_LIMIT
    assert "MemoryError" in result.stderr


@needs_isolation
def test_network_is_unreachable():
    # A listener on the host's loopback: a sandbox sharing the host network could reach it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        body = (
            "import socket\n"
            f"for address in [('127.0.0.1', {port}), ('192.0.2.1', 80)]:\n"  # 192.0.2.1: TEST-NET-1, never routed
            "    s = socket.socket()\n"
            "    s.settimeout(1)\n"
            "    print(address[0], s.connect_ex(address))\n"
        )
        result = run_marked(body)
        with pytest.raises(BlockingIOError):
            listener.accept()
    codes = dict(line.split() for line in result.stdout.splitlines())
    assert result.status is SandboxStatus.OK and set(codes) == {"127.0.0.1", "192.0.2.1"}
    assert all(code != "0" for code in codes.values()), codes


@pytest.fixture
def host_dir():
    """A world-writable host directory outside /tmp: only the read-only mount can stop a write there."""
    path = tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(path, 0o777)
    yield Path(path)
    subprocess.run(["rm", "-rf", path], check=True)


@needs_isolation
def test_writes_outside_the_workdir_fail(host_dir):
    targets = [str(host_dir / "escaped.txt"), "/etc/escaped.txt", "../escaped.txt", "own.txt"]
    body = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('x')\n"
        "        print(path, 'written', sep='\\t')\n"
        "    except OSError as e:\n"
        "        print(path, e.strerror, sep='\\t')\n"
    )
    result = run_marked(body)
    outcome = dict(line.split("\t") for line in result.stdout.splitlines())
    assert outcome["own.txt"] == "written"  # the working directory is writable
    assert outcome[str(host_dir / "escaped.txt")] == "Read-only file system"
    assert outcome["/etc/escaped.txt"] == "Read-only file system"
    assert list(host_dir.iterdir()) == []
    assert not os.path.exists(os.path.join(os.path.dirname(result.workdir), "escaped.txt"))


@needs_isolation
def test_parent_environment_is_not_visible(monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("HYBRID_ALIGN_TEST_SECRET", secret)
    body = (
        "print(dict(os.environ))\n"
        f"for pid in ['1', str(os.getppid()), '{os.getpid()}']:\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(pid, e.strerror)\n"
    )
    result = run_marked(body)
    assert result.status is SandboxStatus.OK
    assert secret not in result.stdout and "HYBRID_ALIGN_TEST_SECRET" not in result.stdout
    assert "PATH" in result.stdout  # the scrubbed environment was printed


@needs_isolation
def test_killing_its_parent_and_others_fails():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        body = (
            "import signal\n"
            f"for pid in [os.getppid(), {os.getpid()}, {bystander.pid}, -1]:\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n"
            "        pass\n"
            "print('still here')\n"
        )
        result = run_marked(body)
        assert bystander.poll() is None, "the sandbox killed a host process"
    finally:
        bystander.kill()
        bystander.wait()
    assert result.status is SandboxStatus.OK and result.stdout == "still here\n"


@needs_isolation
def test_stdout_flood_is_cut_at_the_output_limit():
    result = run_marked("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n")
    assert result.status is SandboxStatus.OUTPUT_LIMIT
    assert 0 < len(result.stdout) <= LIMITS.max_output_bytes
    assert result.duration_s < LIMITS.wall_s


@pytest.fixture
def broken_bwrap(host_dir):
    """A bwrap that fails the way it does on kernels without unprivileged user namespaces."""
    fake = host_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)  # in a directory the sandbox user can enter (pytest's tmp_path is private to root)
    return str(fake)


def test_refuses_loudly_without_isolation(broken_bwrap):
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*allow_unisolated"):
        Sandbox(bwrap=broken_bwrap).run("print('hi')")
    with pytest.raises(SandboxUnavailable, match="/nonexistent/bwrap not found"):
        Sandbox(bwrap="/nonexistent/bwrap").run("print('hi')")


def test_unisolated_opt_in_runs_and_says_so(broken_bwrap):
    sandbox = Sandbox(bwrap=broken_bwrap, allow_unisolated=True)
    result = sandbox.run("import os\nprint(os.getcwd() == os.environ['HOME'])", limits=LIMITS)
    assert result.status is SandboxStatus.OK and result.stdout == "True\n"
    assert not result.isolated
    assert "network: NOT isolated" in result.notes and result.notes[0].startswith("UNISOLATED")
    assert not os.path.exists(result.workdir)
    timed_out = sandbox.run("import time\ntime.sleep(30)", limits=SandboxLimits(wall_s=0.5))
    assert timed_out.status is SandboxStatus.TIMEOUT


def test_run_program_reads_the_opt_in_from_the_environment(monkeypatch):
    import envs.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_DEFAULT_SANDBOXES", {})
    monkeypatch.setattr(Sandbox, "_bwrap_path", lambda self: "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable):
        run_program("print(1)")
    monkeypatch.setenv("HYBRID_ALIGN_ALLOW_UNISOLATED", "1")
    assert run_program("print(1)", limits=LIMITS).stdout == "1\n"
