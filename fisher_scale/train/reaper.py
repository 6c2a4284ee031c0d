"""A local Ray instance ends with the driver that started it, however the driver ends.

Killed with SIGKILL, a driver leaves the Ray processes it started behind: the GCS and raylet notice, but the
dashboard and runtime-env agents keep running (and listening) for minutes. A small watcher process holds the read
end of a pipe that only the driver writes to; the pipe closes when the driver dies, in any way, and the watcher
then kills the processes it last saw under the driver. Run as ``python -m fisher_scale.train.reaper PID``.
"""

from __future__ import annotations

import subprocess
import sys
import threading

#: seconds between two looks at the driver's process tree
POLL_S = 1.0

_watchers: list[subprocess.Popen] = []


def reap_with_this_process() -> None:
    """Start the watcher of this process (once); its pipe stays open for the life of this process."""
    if _watchers:
        return
    import os

    watcher = subprocess.Popen(
        [sys.executable, "-m", "fisher_scale.train.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # Ctrl+C in the terminal reaches the driver, not the watcher
    )
    _watchers.append(watcher)


def _watch(driver_pid: int) -> None:
    import os

    import psutil

    seen: dict[int, psutil.Process] = {}
    gone = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        gone.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    try:
        driver = psutil.Process(driver_pid)
        while not gone.wait(POLL_S):
            seen.update({p.pid: p for p in driver.children(recursive=True) if p.pid != os.getpid()})
    except psutil.NoSuchProcess:
        pass
    survivors = []
    for process in seen.values():
        try:
            survivors += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in survivors:
        try:
            process.kill()  # Process remembers its start time: a reused pid is not killed
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
