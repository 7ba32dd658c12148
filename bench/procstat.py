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

