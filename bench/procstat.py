"""CPU time and peak memory of one child process, measured the same way for every configuration.

CPU is read from ``/proc/<pid>/stat`` at two instants (when the worker got its partitions and
when its last commit landed), so start-up (imports, loading the model and reference tables) is
not charged to the orders. Peak RSS is the kernel's high-water mark (VmHWM) read just before
the worker is stopped, and ``wait4``'s rusage of that one child where /proc is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (all its threads); None where /proc is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def peak_rss_mb(pid: int) -> float | None:
    """The kernel's high-water mark of the resident set of ``pid`` (VmHWM), in MiB.

    Read while the process runs: after ``exec`` it covers this program only, whereas the
    rusage of a child also counts the parent's pages it carried between fork and exec.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def children_of(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux ``/proc``); empty where it is not."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return []


@dataclass(frozen=True)
class Reaped:
    exit_code: int
    peak_rss_mb: float
    cpu_s: float  # whole life of the process


def _rss_mb(maxrss: int) -> float:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def stop_and_reap(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> Reaped:
    """SIGTERM ``proc``, wait for it (SIGKILL after ``timeout_s``) and return its exit code,
    peak RSS (VmHWM just before the signal, else rusage) and CPU time.

    ``os.wait4`` gives the rusage of this one child; ``Popen.wait`` would discard it.
    """
    hwm = peak_rss_mb(proc.pid) if proc.returncode is None else None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped elsewhere: no rusage to report
            return Reaped(proc.returncode if proc.returncode is not None else -1, 0.0, 0.0)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Reaped(proc.returncode, hwm if hwm is not None else _rss_mb(usage.ru_maxrss),
                          usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + timeout_s
        time.sleep(0.02)



# A process of its own between the bench and the measured command: the kernel counts in a
# child's peak RSS the memory of the process it was forked from, up to its exec (the bench
# holds hundreds of MB; see peak_rss_mb). Forked from this small interpreter instead, the
# command's figure is its own (at least the launcher's ~10 MB). It spawns the command, waits for
# it and writes "<exit code> <ru_maxrss in kB> <user + system CPU s>" to the file argv[1].
_LAUNCHER = """\
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} "
              f"{usage.ru_utime + usage.ru_stime}")
"""


@dataclass(frozen=True)
class Ran:
    """A command run to its end: exit code, peak RSS (MiB), CPU and wall-clock seconds."""

    exit_code: int
    peak_rss_mb: float
    cpu_s: float
    seconds: float


def run_measured(command: list[str], env: dict[str, str], log_path: str | os.PathLike[str],
                 timeout_s: float = 600.0) -> Ran:
    """Run ``command`` to its end, its output to ``log_path``, and return its peak RSS (the
    kernel's ``ru_maxrss`` of it alone, through :data:`_LAUNCHER`), CPU and wall time. Past
    ``timeout_s`` the launcher and the command are killed and TimeoutError raised."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="triage-run-") as work:
        figures = os.path.join(work, "figures")
        with open(log_path, "wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, figures, *command],
                                    env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{command[0]} ran over {timeout_s:.0f} s") from None
            seconds = time.monotonic() - started
        try:
            with open(figures) as f:
                code, maxrss, cpu = f.read().split()
        except (OSError, ValueError):  # the launcher itself failed (no such command, ...)
            return Ran(proc.returncode or -1, 0.0, 0.0, seconds)
    return Ran(int(code), _rss_mb(int(maxrss)), float(cpu), seconds)
