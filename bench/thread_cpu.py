"""CPU time per thread group while a block runs (Linux ``/proc``), for the benches.

Whether a pipeline on a many-core host is bound by its CPU is not visible in its phase timers:
they show where a thread waits, not whether the cores it waits for are all busy.  This reads
every thread's user + system time from ``/proc/self/task/*/stat`` every ``interval`` seconds
(the last reading of a thread that exits in between is kept), names each by its Python thread
(``talon-encode_3`` counts as ``talon-encode``) or else by its kernel name (``native:...``:
CUDA's, PyTorch's and the tokenizer's own threads), and prints the cores each group kept busy
beside the whole host's busy share from ``/proc/stat``.

    with thread_cpu() as report:
        run()
    print(report.table())
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _task_times() -> dict[int, tuple[str, float]]:
    """``{tid: (kernel name, cpu seconds)}`` of this process's threads."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / TICKS)  # utime, stime
    return out


def _host_busy_and_total() -> tuple[float, float]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def group_of(name: str) -> str:
    """``talon-encode_3`` -> ``talon-encode``, ``talon-part-writer-2`` -> ``talon-part-writer``."""
    return re.sub(r"[-_]\d+$", "", name)


@dataclass
class ThreadCpuReport:
    wall: float = 0.0
    cores: int = os.cpu_count() or 1
    host_busy: float = 0.0  # share of all the host's cores busy over the block
    process: float = 0.0  # cores this process kept busy
    groups: dict[str, float] = field(default_factory=dict)  # cores per thread group

    def table(self) -> str:
        rows = sorted(self.groups.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{name} {cores:.2f}" for name, cores in rows if cores >= 0.05)
        return (f"CPU over {self.wall:.1f} s: the host's {self.cores} cores {100 * self.host_busy:.0f} % busy; this "
                f"process {self.process:.2f} cores: {listed}")

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cores": self.cores, "host_busy": self.host_busy, "process_cores": self.process,
                "cores_per_group": dict(self.groups)}


@contextlib.contextmanager
def thread_cpu(interval: float = 0.25):
    """Measure the block; the yielded report is filled in when the block ends."""
    report = ThreadCpuReport()
    if not Path("/proc/self/task").is_dir():  # not Linux: an empty report
        yield report
        return
    first = _task_times()
    last = dict(first)
    names: dict[int, str] = {}
    stop = threading.Event()

    def poll() -> None:
        while True:
            for thread in threading.enumerate():
                if thread.native_id is not None:
                    names[thread.native_id] = thread.name
            last.update(_task_times())
            if stop.wait(interval):
                return

    busy0, total0 = _host_busy_and_total()
    process0 = sum(os.times()[:2])
    started = time.perf_counter()
    poller = threading.Thread(target=poll, name="thread-cpu-poller", daemon=True)
    poller.start()
    try:
        yield report
    finally:
        stop.set()
        poller.join()
        last.update(_task_times())
        report.wall = time.perf_counter() - started
        busy1, total1 = _host_busy_and_total()
        report.host_busy = (busy1 - busy0) / max(total1 - total0, 1)
        report.process = (sum(os.times()[:2]) - process0) / report.wall
        groups: dict[str, float] = {}
        for tid, (comm, seconds) in last.items():
            spent = seconds - first.get(tid, (comm, 0.0))[1]
            name = group_of(names[tid]) if tid in names else f"native:{group_of(comm)}"
            groups[name] = groups.get(name, 0.0) + spent / report.wall
        attributed = sum(groups.values())
        if report.process - attributed >= 0.05:  # threads that ended between two readings
            groups["(ended unread)"] = report.process - attributed
        report.groups = groups
