"""Runs supervisord in this process (PID 1) and exits with the status stop_on_exit.py recorded.

supervisord's own exit status is always 0; a container must instead end with the failed program's
status (78 for a configuration error) so Docker, Nomad and Kubernetes see the failure.
"""
import os
import sys

from supervisor import supervisord


def main() -> int:
    status_file = os.path.join(os.environ["SUPERVISOR_RUN_DIR"], "exit-status")
    try:
        os.unlink(status_file)
    except FileNotFoundError:
        pass
    supervisord.main(sys.argv[1:])
    try:
        with open(status_file) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0  # stopped from outside (docker stop): a clean exit


if __name__ == "__main__":
    sys.exit(main())
