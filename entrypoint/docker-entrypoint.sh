#!/usr/bin/env bash
# Container entrypoint: checks the configuration, then makes supervisord PID 1 with the program of
# FLEET_ROLE (prefill|decode|regular -> `sglang-fleet node`; router -> `sglang-fleet router`).
#
#   docker run IMAGE                  # the role's program under supervisord
#   docker run IMAGE healthcheck      # what HEALTHCHECK runs
#   docker run IMAGE sglang-fleet status|plan|...   # any other command runs as given
set -euo pipefail

export FLEET_HOME=${FLEET_HOME:-/opt/sglang-fleet}
export SUPERVISOR_RUN_DIR=${SUPERVISOR_RUN_DIR:-/run/sglang-fleet}
SUPERVISOR_DIR=/etc/sglang-fleet/supervisord

program_for_role() {
  case "${FLEET_ROLE:-regular}" in
    router) echo router ;;
    *) echo node ;;  # prefill, decode, regular; an unknown role is reported by the config check
  esac
}

# Bad configuration stops here with exit 78 and sglang-fleet's one-line-per-problem report on stderr,
# before supervisord starts anything.
check_config() {
  "$FLEET_HOME/bin/python" - <<'PY'
import sys
from sglang_fleet.config import EX_CONFIG, ConfigError, load_config
try:
    load_config()
except ConfigError as e:  # the same report `sglang-fleet` prints
    n = len(e.problems)
    print(f"sglang-fleet: configuration error ({n} problem{'s' if n != 1 else ''}):", file=sys.stderr)
    for problem in e.problems:
        print(f"  - {problem}", file=sys.stderr)
    sys.exit(EX_CONFIG)
PY
}

healthcheck() {
  local conf="$SUPERVISOR_RUN_DIR/supervisord.conf"
  # Every program RUNNING (exit 3 from supervisorctl when one is not).
  "$FLEET_HOME/bin/supervisorctl" -c "$conf" status >/dev/null || return 1
  if [ "$(program_for_role)" = router ]; then
    "$FLEET_HOME/bin/python" - "${FLEET_ROUTER_PORT:-8000}" <<'PY' || return 1
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=4).read()
PY
  fi
}

run_supervisord() {
  local program grace conf
  program=$(program_for_role)
  mkdir -p "$SUPERVISOR_RUN_DIR"
  # supervisord sends SIGKILL this long after SIGTERM: the node's drain (rank 0 lets the requests in
  # flight finish), its engine's grace, plus time to withdraw. The container's stop timeout must be at
  # least this (docs/operations.md).
  grace=${FLEET_STOP_GRACE:-30}
  drain=${FLEET_DRAIN_TIMEOUT:-30}
  export SUPERVISOR_STOPWAIT=$(( ${grace%.*} + ${drain%.*} + 15 ))
  conf="$SUPERVISOR_RUN_DIR/supervisord.conf"
  cat "$SUPERVISOR_DIR/supervisord.conf" "$SUPERVISOR_DIR/$program.conf" >"$conf"
  exec "$FLEET_HOME/bin/python" "$SUPERVISOR_DIR/pid1.py" -c "$conf"
}

case "${1:-}" in
  "") check_config; run_supervisord ;;
  healthcheck) healthcheck ;;
  check) check_config ;;
  *) exec "$@" ;;
esac
