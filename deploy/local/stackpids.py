"""PIDs of a local stack's processes, for deploy/local/up.sh and down.sh (Linux /proc).

Usage: stackpids.py PATH [PID ...]: every process whose command line names PATH (Ray's daemons and
workers all carry their temp dir), plus the given PIDs and all their descendants; never this process
or its ancestors (the shell running down.sh names PATH too). One PID per line, sorted.
"""

from __future__ import annotations

import os
import sys


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line with spaces), for processes that have not exited."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # exited meanwhile
        if state != "Z":  # a zombie has exited; only its parent's wait() can remove it
            out[int(entry)] = (int(ppid), cmd)
    return out


def stack_pids(path: str, roots: list[int]) -> list[int]:
    procs = _procs()
    me, ancestors = os.getpid(), set()
    p = me
    while p in procs and p not in ancestors:
        ancestors.add(p)
        p = procs[p][0]
    chosen = {pid for pid, (_, cmd) in procs.items() if path in cmd} | {r for r in roots if r in procs}
    grew = True
    while grew:  # add descendants until nothing new
        new = {pid for pid, (ppid, _) in procs.items() if ppid in chosen} - chosen
        chosen |= new
        grew = bool(new)
    return sorted(chosen - ancestors)


if __name__ == "__main__":
    print("\n".join(str(p) for p in stack_pids(sys.argv[1], [int(a) for a in sys.argv[2:]])))
