"""Ends the processes of a Ray cluster a study started, once the study's process is gone.

``ray.init()`` starts a cluster whose agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a driver that is killed (SIGKILL, an out-of-memory
kill, a closed terminal): nothing in the driver runs then. So the ``RayExecutor`` that
starts a cluster also starts this script, in a session of its own, with a pipe from the
driver: the cluster's node id comes first, and the pipe closes when the driver exits,
however it exits. The script then ends every process of this user whose environment
names that node (``RAY_NODE_ID``), and exits.

Run as a file (``python _reaper.py``), it imports only the standard library, so it costs
no torch import. Linux only (it reads ``/proc``); elsewhere it does nothing, and
docs/errors.md says how to clean up by hand.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

GRACE_SECONDS = 3.0
"""How long processes have to exit on SIGTERM before they are killed."""


def processes_of(node_id: str, proc: Path = Path("/proc")) -> list[int]:
    """The ids of this user's processes whose environment has ``RAY_NODE_ID=node_id``."""
    marker = f"RAY_NODE_ID={node_id}".encode()
    found = []
    me = os.getpid()
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def end(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL for those still there after the grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 0.0)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in alive if _running(pid)]
        pids = alive


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def main() -> int:
    node_id = sys.stdin.readline().strip()
    if not node_id:
        return 0  # the driver died before its cluster started: nothing to end
    sys.stdin.read()  # returns when the driver's end of the pipe closes
    end(processes_of(node_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
