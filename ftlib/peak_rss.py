"""Peak resident memory of one run, even when several runs share a process (a sweep).

`getrusage`'s ru_maxrss only ever grows, so in a sweep every run after the largest
would report that run's peak. On Linux the kernel's high-water mark can be reset
(`/proc/self/clear_refs`, value 5) and read back (`VmHWM`); elsewhere the process
peak is the best available. Memory an earlier run left allocated still counts.
"""

import resource
import sys
from pathlib import Path

_PROC = Path("/proc/self")


def reset() -> bool:
    """Starts a new peak at the current RSS; False where the platform cannot."""
    try:
        (_PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS in MB since the last `reset()` (the process's peak where unsupported)."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, kB on Linux
