"""What a measurement records about where it ran: the source commit and the CPU."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit(cwd: str = _HERE) -> Optional[str]:
    """HEAD of the checkout at `cwd` (default: the one this package runs from), with
    "+dirty" when tracked files have changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_name() -> Optional[str]:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
