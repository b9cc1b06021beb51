"""Processes for the benchmark: their CPU and memory, how much CPU others used,
waiting for one to be ready or idle, stopping one, and polling for a condition."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmHWM: peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _all_procs() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds incl. reaped children) for every process we may read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
        out[int(entry)] = (int(fields[1]), cpu)
    return out


def tree_cpu_s(*roots: int) -> float:
    """CPU seconds of the processes `roots` and their descendants, reaped children
    included (a process's CPU counts in its parent's once it has exited)."""
    procs = _all_procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, [r for r in roots if r in procs], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += procs[pid][1]
        todo += children.get(pid, [])
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user + nice + system: what processes are charged with (irq, softirq and steal are
    # charged to no process, so they would count as someone else's).
    return sum(values[:3]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """How much CPU did processes that are not ours use during a phase?

    Ours: this process, its descendants (Redis, listeners, pgbench, helpers) and the
    PostgreSQL cluster (the postmaster and its backends). Reaped children count in their
    parent's totals. Everything else busy on the machine is someone else's load, which
    makes a run noisy: reported per phase.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.foreign_pct: dict[str, float] = {}

    def _ours_s(self) -> float:
        return tree_cpu_s(*self.roots)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        busy0, ours0, t0 = machine_busy_s(), self._ours_s(), time.monotonic()
        yield
        busy1, ours1, t1 = machine_busy_s(), self._ours_s(), time.monotonic()
        foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        self.foreign_pct[name] = 100 * foreign / max(t1 - t0, 1e-9)


def wait_idle(pid: int, timeout_s: float = 30.0) -> None:
    """Until a process stops using CPU (two 0.2 s windows with at most one tick each)."""
    deadline = time.monotonic() + timeout_s
    quiet, last = 0, proc_cpu_s(pid)
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = proc_cpu_s(pid)
        quiet = quiet + 1 if now - last <= 0.011 else 0
        last = now


def read_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{what} did not start: {line!r}")


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 30.0) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.002) -> float:
    """Poll until predicate() is true; return time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
