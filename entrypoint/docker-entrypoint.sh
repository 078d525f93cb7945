#!/usr/bin/env bash
# Container entrypoint: checks the configuration, then makes supervisord PID 1 with the program of
# FLEET_ROLE (prefill|decode|regular -> `sglang-fleet node`; router -> `sglang-fleet router`).
#
#   docker run IMAGE                  # the role's program under supervisord
#   docker run IMAGE --mem-fraction-static 0.85 ...   # the same, with extra launch_server flags
#   docker run IMAGE healthcheck      # what HEALTHCHECK runs
#   docker run IMAGE sglang-fleet status|plan|...   # any other command runs as given
set -euo pipefail

export FLEET_HOME=${FLEET_HOME:-/opt/sglang-fleet}
export SUPERVISOR_RUN_DIR=${SUPERVISOR_RUN_DIR:-/run/sglang-fleet}
SUPERVISOR_DIR=${SUPERVISOR_DIR:-/etc/sglang-fleet/supervisord}  # tests point it elsewhere

program_for_role() {
  case "${FLEET_ROLE:-regular}" in
    router) echo router ;;
    *) echo node ;;  # prefill, decode, regular; an unknown role is reported by the config check
  esac
}

# Bad configuration stops here with exit 78 and the report every sglang-fleet command prints (one line
# per problem, on stderr), before supervisord starts anything.
check_config() {
  "$FLEET_HOME/bin/sglang-fleet" config check
}

healthcheck() {
  local conf="$SUPERVISOR_RUN_DIR/supervisord.conf" port=${FLEET_HEALTH_PORT:-9400} url
  # Every program RUNNING (exit 3 from supervisorctl when one is not).
  "$FLEET_HOME/bin/supervisorctl" -c "$conf" status >/dev/null || return 1
  if [ "$port" != 0 ]; then
    # The supervisor's own verdict (docs/operations.md): a node is part of a serving generation; the
    # router agent has read Consul and its smg answers. (python: the slim base image has no curl.)
    url="http://127.0.0.1:$port/readyz"
  elif [ "$(program_for_role)" = router ]; then
    url="http://127.0.0.1:${FLEET_ROUTER_PORT:-8000}/health"
  else
    return 0
  fi
  "$FLEET_HOME/bin/python" - "$url" <<'PY' || return 1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=4).read()
PY
}

# The container's arguments that start with -- are extra launch_server flags (`sglang-fleet node -- ...`);
# supervisord splits command= with shlex after expanding %(...)s, so they are quoted and % doubled.
with_engine_args() {
  "$FLEET_HOME/bin/python" - "$@" <<'PY'
import shlex, sys
conf, program, args = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(conf) as f:
    text = f.read()
line = f"command=sglang-fleet {program}\n"
assert line in text, f"{conf}: no {line!r}"
with open(conf, "w") as f:
    f.write(text.replace(line, f"command=sglang-fleet {program} -- {shlex.join(args).replace('%', '%%')}\n"))
PY
}

run_supervisord() {
  local program conf
  program=$(program_for_role)
  mkdir -p "$SUPERVISOR_RUN_DIR"
  # supervisord sends SIGKILL this long after SIGTERM: the drain, the engine's grace and time to
  # withdraw, from the loaded configuration (preset, config file, env, engine flags). The container's stop
  # timeout must be at least this (docs/operations.md). Loading it is also the configuration check.
  SUPERVISOR_STOPWAIT=$("$FLEET_HOME/bin/sglang-fleet" config stop-wait ${1+-- "$@"}) || exit $?
  export SUPERVISOR_STOPWAIT
  conf="$SUPERVISOR_RUN_DIR/supervisord.conf"
  cat "$SUPERVISOR_DIR/supervisord.conf" "$SUPERVISOR_DIR/$program.conf" >"$conf"
  [ $# -eq 0 ] || with_engine_args "$conf" "$program" "$@"
  exec "$FLEET_HOME/bin/python" "$SUPERVISOR_DIR/pid1.py" -c "$conf"
}

case "${1:-}" in
  "") run_supervisord ;;
  --*) run_supervisord "$@" ;;
  healthcheck) healthcheck ;;
  check) check_config ;;
  *) exec "$@" ;;
esac
