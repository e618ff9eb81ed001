"""CPU time and resident memory of a process tree, read from /proc (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the `(comm)` field: index 0 is field 3 (state)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its living descendants (nginx master + worker, and the like)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int, tree: bool = True) -> float:
    """utime + stime, summed over the process tree (each process's figure covers all its threads);
    of `root` alone when `tree` is false."""
    ticks = 0
    for pid in process_tree(root) if tree else [root]:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / CLK_TCK


def rss_kib(root: int) -> int:
    """VmRSS in KiB, summed over the process tree."""
    total = 0
    for pid in process_tree(root):
        try:
            status = (_PROC / str(pid) / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


def machine_busy_seconds() -> float:
    """user + nice + system time of all CPUs (from /proc/stat), without irq/softirq/steal.

    Those three are left out because with IRQ time accounting the loopback traffic's softirq work
    is counted there rather than in any process, so they cannot be compared with process times.
    """
    with open(_PROC / "stat") as stat:
        fields = stat.readline().split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / CLK_TCK
