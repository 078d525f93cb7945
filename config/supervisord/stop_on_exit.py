"""supervisord event listener: when a program exits or cannot start, stop the container with its status.

supervisord itself always exits 0, so the status is written to a file that pid1.py returns after
supervisord has shut everything down. Protocol: https://supervisord.org/events.html
"""
from __future__ import annotations

import os
import sys

from supervisor import childutils

EX_SOFTWARE = 70  # sysexits.h: the program failed in a way it did not report
EX_NOTFOUND = 127


def exit_status(rpc, name: str, event: str) -> int:
    info = rpc.supervisor.getProcessInfo(name)
    if event == "PROCESS_STATE_FATAL":
        return EX_NOTFOUND if "can't find command" in (info.get("spawnerr") or "") else EX_SOFTWARE
    status = info.get("exitstatus", EX_SOFTWARE)
    return status if status >= 0 else EX_SOFTWARE  # -1: killed by a signal


def main() -> None:
    rpc = childutils.getRPCInterface(os.environ)
    status_file = os.path.join(os.environ["SUPERVISOR_RUN_DIR"], "exit-status")
    me = os.environ.get("SUPERVISOR_PROCESS_NAME")
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        fields, _ = childutils.eventdata(payload + "\n")
        name = fields.get("processname")
        if name and name != me:
            status = exit_status(rpc, name, headers["eventname"])
            sys.stderr.write(f"stop-on-exit: {name} {headers['eventname'].split('_')[-1].lower()} "
                             f"(status {status}); stopping the container\n")
            sys.stderr.flush()
            if not os.path.exists(status_file):  # the first failure is the one to report
                with open(status_file, "w") as f:
                    f.write(str(status))
            childutils.listener.ok(sys.stdout)
            rpc.supervisor.shutdown()
            continue
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
