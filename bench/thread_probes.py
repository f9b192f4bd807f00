"""Where a bench's threads spend their time: CPU time per thread group (:func:`thread_cpu`) and
stack samples of named threads (:func:`thread_sampler`), each while a block runs.

Whether a pipeline on a many-core host is bound by its CPU is not visible in its phase timers:
they show where a thread waits, not whether the cores it waits for are all busy.
:func:`thread_cpu` reads
every thread's user + system time from ``/proc/self/task/*/stat`` every ``interval`` seconds
(the last reading of a thread that exits in between is kept), names each by its Python thread
(``talon-encode_3`` counts as ``talon-encode``) or else by its kernel name (``native:...``:
CUDA's, PyTorch's and the tokenizer's own threads), and prints the cores each group kept busy
beside the whole host's busy share from ``/proc/stat``.  It also runs a GIL probe: a thread that
sleeps 2 ms at a time (the GIL released) and records how much later than asked it runs Python
again.  On an idle interpreter that is the OS's wake-up (~0.1 ms); when other threads keep the
GIL busy it is mostly the wait for it, which no CPU counter shows.

    with thread_cpu() as report:
        run()
    print(report.table())
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
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
    gil_wait_ms: dict[str, float] = field(default_factory=dict)  # the GIL probe's lateness, see wait_percentiles

    def table(self) -> str:
        rows = sorted(self.groups.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{name} {cores:.2f}" for name, cores in rows if cores >= 0.05)
        line = (f"CPU over {self.wall:.1f} s: the host's {self.cores} cores {100 * self.host_busy:.0f} % busy; this "
                f"process {self.process:.2f} cores: {listed}")
        if self.gil_wait_ms:
            waits = self.gil_wait_ms
            line += (f"; GIL probe late by {waits['median']:.2f} ms (median), {waits['p90']:.2f} (p90), "
                     f"{waits['p99']:.2f} (p99) over {waits['count']:.0f} wake-ups")
        return line

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cores": self.cores, "host_busy": self.host_busy, "process_cores": self.process,
                "cores_per_group": dict(self.groups), "gil_probe_late_ms": dict(self.gil_wait_ms)}


def wait_percentiles(late_seconds: list[float]) -> dict[str, float]:
    """Median, p90 and p99 (nearest rank) of the probe's lateness, in ms; empty without samples."""
    if not late_seconds:
        return {}
    ordered = sorted(late_seconds)

    def rank(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]

    return {"median": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "count": float(len(ordered))}


@contextlib.contextmanager
def polling(step, interval: float, name: str):
    """Call ``step()`` every ``interval`` seconds on a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            step()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def gil_probe(late: list[float], sleep: float = 0.002):
    """While the block runs, append to ``late`` how late (seconds) a thread that sleeps
    ``sleep`` at a time (the GIL released) runs Python again after each sleep."""
    woke = [time.perf_counter()]

    def step() -> None:
        now = time.perf_counter()
        late.append(max(0.0, now - woke[0] - sleep))
        woke[0] = time.perf_counter()

    with polling(step, sleep, "gil-probe"):
        yield


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

    def poll() -> None:
        for thread in threading.enumerate():
            if thread.native_id is not None:
                names[thread.native_id] = thread.name
        last.update(_task_times())

    busy0, total0 = _host_busy_and_total()
    process0 = sum(os.times()[:2])
    started = time.perf_counter()
    poll()
    late: list[float] = []
    try:
        with polling(poll, interval, "thread-cpu-poller"), gil_probe(late):
            yield report
    finally:
        report.gil_wait_ms = wait_percentiles(late)
        poll()
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


@contextlib.contextmanager
def thread_sampler(interval: float = 0.01, top: int = 12, threads: tuple[str, ...] = ("MainThread", "talon-prefetch")):
    """Where the named threads are, sampled every ``interval`` seconds while the block runs;
    prints, per thread, the ``top`` places (innermost frame in the repository's own code, and the
    innermost frame) with their share of the samples.  A place inside a call that holds the GIL,
    or waits for it, shows up as long as it lasts, which is what the phase timers cannot see."""
    import collections

    repo = str(Path(__file__).resolve().parents[1])
    counts: dict[str, collections.Counter] = {name: collections.Counter() for name in threads}

    def own(filename: str) -> bool:
        return filename.startswith(repo) and not any(part in filename for part in ("/bench/", "-packages/", "/.venv/"))

    def place(frame) -> str:
        inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
        ours = frame
        while ours is not None and not own(ours.f_code.co_filename):
            ours = ours.f_back
        if ours is None or ours is frame:
            return inner
        return f"{Path(ours.f_code.co_filename).name}:{ours.f_code.co_name}:{ours.f_lineno} > {inner}"

    def sample() -> None:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            name = names.get(ident)
            if name in counts:
                counts[name][place(frame)] += 1

    try:
        with polling(sample, interval, "thread-sampler"):
            yield counts
    finally:
        for name, counter in counts.items():
            total = max(1, sum(counter.values()))
            print(f"thread {name}, {total} samples every {interval * 1e3:.0f} ms:", file=sys.stderr)
            for where, n in counter.most_common(top):
                print(f"  {100 * n / total:5.1f}%  {where}", file=sys.stderr)
