"""What /proc says about the processes under test: CPU time, memory and core load (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx's master and its worker)."""
    found = [pid]
    for current in found:
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                found.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of `pids` (fields 14 and 15 of /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; fields after it are plain.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size summed over `pids` (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class CoreTimes:
    """Busy and total jiffies per core, from /proc/stat."""

    busy: dict[int, int]
    total: dict[int, int]

    @classmethod
    def now(cls) -> CoreTimes:
        busy: dict[int, int] = {}
        total: dict[int, int] = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                numbers = [int(value) for value in values[:8]]
                idle = numbers[3] + numbers[4]  # idle + iowait
                core = int(name[3:])
                total[core] = sum(numbers)
                busy[core] = total[core] - idle
        return cls(busy, total)

    def busy_percent_since(self, earlier: CoreTimes) -> dict[int, float]:
        """Per core: the share of time it was busy between `earlier` and this sample."""
        shares: dict[int, float] = {}
        for core, total in self.total.items():
            elapsed = total - earlier.total.get(core, 0)
            if elapsed > 0:
                shares[core] = 100.0 * (self.busy[core] - earlier.busy.get(core, 0)) / elapsed
        return shares
