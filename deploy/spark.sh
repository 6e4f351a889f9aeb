#!/usr/bin/env bash
# Local Spark standalone cluster for development, tests and benchmarks: one
# Master and N Workers, each its own JVM, bound to 127.0.0.1 only, started
# from the pyspark install (it ships bin/spark-class but no sbin/ scripts).
# Runtime files (PIDs, logs, executor work dirs) live under
# ${PACS_STACK_DIR:-<repo>/.stack}/spark.
set -euo pipefail

LOG_TAG=spark
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MASTER_PORT="${PACS_SPARK_MASTER_PORT:-17077}"
UI_PORT="${PACS_SPARK_UI_PORT:-18080}"
WORKER_UI_PORT="${PACS_SPARK_WORKER_UI_PORT:-18081}"
NUM_WORKERS="${PACS_SPARK_WORKERS:-2}"
WORKER_CORES="${PACS_SPARK_WORKER_CORES:-1}"
WORKER_MEMORY="${PACS_SPARK_WORKER_MEMORY:-2g}"
DAEMON_MEMORY="${PACS_SPARK_DAEMON_MEMORY:-512m}"
UP_TIMEOUT="${PACS_SPARK_UP_TIMEOUT:-120}"
STOP_TIMEOUT=30
MAX_WORKERS=16

SPARK_DIR="$PACS_STACK_DIR/spark"
LOG_DIR="$SPARK_DIR/logs"
PID_DIR="$SPARK_DIR/pids"
WORK_DIR="$SPARK_DIR/work"

MASTER_URL="spark://127.0.0.1:$MASTER_PORT"
JSON_URL="http://127.0.0.1:$UI_PORT/json/"

usage() {
  cat <<EOF
Usage: deploy/spark.sh COMMAND

Commands:
  up | start     start the Master and \$PACS_SPARK_WORKERS Workers (only those not
                 running; Workers numbered above that count are stopped) and wait
                 until exactly that many are registered and alive
  down | stop    stop the Workers, then the Master (TERM, then KILL after ${STOP_TIMEOUT}s)
  status         one line per daemon and the Master's count of alive Workers;
                 exit 0 if the Master and \$PACS_SPARK_WORKERS Workers run, 3 otherwise
  env            print export lines for the Python code (PACS_SPARK_MASTER, SPARK_HOME)
  clean          down, then delete \$PACS_STACK_DIR/spark (logs, executor work dirs)
  help           this text

Environment (defaults):
  PACS_STACK_DIR             $PACS_STACK_DIR
  SPARK_HOME                 the pyspark package of .venv (or of python3)
  PACS_SPARK_MASTER_PORT     Master RPC port (17077)
  PACS_SPARK_UI_PORT         Master web UI port; its /json/ lists the Workers (18080)
  PACS_SPARK_WORKER_UI_PORT  Worker N's web UI port is this + N - 1 (18081)
  PACS_SPARK_WORKERS         number of Workers (2, at most $MAX_WORKERS)
  PACS_SPARK_WORKER_CORES    cores each Worker offers (1)
  PACS_SPARK_WORKER_MEMORY   memory each Worker offers to executors (2g)
  PACS_SPARK_DAEMON_MEMORY   -Xmx of the Master and Worker daemons (512m)
  PACS_SPARK_UP_TIMEOUT      seconds 'up' waits for the Workers (120)
EOF
}

# ---------------------------------------------------------------- helpers

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH${2:+ ($2)}"; }

spark_home() { # the folder holding bin/spark-class: $SPARK_HOME, else the installed pyspark package
  if [[ -n "${SPARK_HOME:-}" ]]; then
    [[ -x "$SPARK_HOME/bin/spark-class" ]] || die "SPARK_HOME=$SPARK_HOME has no bin/spark-class"
    echo "$SPARK_HOME"
    return 0
  fi
  local py home
  for py in "$PACS_REPO_DIR/.venv/bin/python" python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    home="$("$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null)" || continue
    if [[ -x "$home/bin/spark-class" ]]; then
      echo "$home"
      return 0
    fi
  done
  die "no pyspark install found (run deploy/install.sh, or set SPARK_HOME)"
}

valid_count() {
  [[ "$NUM_WORKERS" =~ ^[0-9]+$ ]] && ((NUM_WORKERS >= 1 && NUM_WORKERS <= MAX_WORKERS)) ||
    die "PACS_SPARK_WORKERS must be 1..$MAX_WORKERS (got '$NUM_WORKERS')"
}

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }
# Unique string on each daemon's command line, checked before trusting a PID.
marker() { echo "-Dpacs.daemon=spark-$1@$PACS_STACK_DIR"; }

role_pid() { # print the PID of a running role, or nothing
  local pid
  pid="$(read_pid "$(pid_file "$1")")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "$(marker "$1")"; then echo "$pid"; fi
}

worker_ui_port() { echo $((WORKER_UI_PORT + $1 - 1)); }

role_ports() {
  case "$1" in
    master) echo "$MASTER_PORT $UI_PORT" ;;
    worker*) worker_ui_port "${1#worker}" ;;
  esac
}

role_desc() {
  case "$1" in
    master) echo "$MASTER_URL web UI http://127.0.0.1:$UI_PORT" ;;
    worker*) echo "$WORKER_CORES core(s), $WORKER_MEMORY, web UI http://127.0.0.1:$(worker_ui_port "${1#worker}")" ;;
  esac
}

running_workers() { # names of the Worker roles with a PID file, in order
  local f
  for f in "$PID_DIR"/worker*.pid; do
    [[ -e "$f" ]] || continue
    basename "$f" .pid
  done | sort -V
}

master_json() { curl -sf --max-time 3 "$JSON_URL" 2>/dev/null || true; }
json_num() { { grep -o "\"$1\" *: *[0-9]*" | grep -o '[0-9]*$' | head -n1; } || true; }

# start_role ROLE: launch the daemon unless it already runs.
start_role() {
  local role="$1" pid port main args=()
  pid="$(role_pid "$role")"
  if [[ -n "$pid" ]]; then
    log "$role already running (pid $pid)"
    return 0
  fi
  for port in $(role_ports "$role"); do
    if port_in_use "$port"; then
      die "port $port needed by $role is in use: $(port_listener "$port")"
    fi
  done
  case "$role" in
    master)
      main=org.apache.spark.deploy.master.Master
      args=(--host 127.0.0.1 --port "$MASTER_PORT" --webui-port "$UI_PORT") ;;
    worker*)
      main=org.apache.spark.deploy.worker.Worker
      mkdir -p "$WORK_DIR/$role"
      args=(--host 127.0.0.1 --cores "$WORKER_CORES" --memory "$WORKER_MEMORY"
        --webui-port "$(worker_ui_port "${role#worker}")" --work-dir "$WORK_DIR/$role" "$MASTER_URL") ;;
  esac
  local log
  log="$(log_file "$role")"
  printf '===== %s starting %s =====\n' "$(date -Is)" "$role" >>"$log"
  # setsid: the daemon gets its own session and outlives this shell; spark-class
  # execs java, so $! ends up being the JVM (checked below).
  (
    export SPARK_HOME="$HOME_DIR" SPARK_LOCAL_IP=127.0.0.1 SPARK_DAEMON_MEMORY="$DAEMON_MEMORY"
    export SPARK_DAEMON_JAVA_OPTS="$(marker "$role") ${SPARK_DAEMON_JAVA_OPTS:-}"
    cd "$SPARK_DIR" && exec setsid "$HOME_DIR/bin/spark-class" "$main" "${args[@]}" </dev/null >>"$log" 2>&1
  ) &
  pid=$!
  local i
  for ((i = 0; i < 50; i++)); do # spark-class runs the launcher first, then execs java
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */java ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$pid" >"$(pid_file "$role")"
  log "started $role (pid $pid): $(role_desc "$role")"
}

stop_role() {
  local role="$1" pid
  STOPPED=0
  pid="$(role_pid "$role")"
  if [[ -n "$pid" ]]; then
    log "stopping $role (pid $pid)"
    stop_pid "$pid" "$STOP_TIMEOUT"
    STOPPED=1
  fi
  rm -f "$(pid_file "$role")"
}

check_alive_or_die() {
  local role
  for role in "$@"; do
    if [[ -z "$(role_pid "$role")" ]]; then
      tail_log "$(log_file "$role")" 60
      die "$role exited during startup (log above: $(log_file "$role"))"
    fi
  done
}

wait_cluster() { # until the Master answers and exactly NUM_WORKERS Workers are alive
  local deadline=$((SECONDS + UP_TIMEOUT)) json alive roles=(master) n
  for ((n = 1; n <= NUM_WORKERS; n++)); do roles+=("worker$n"); done
  while :; do
    check_alive_or_die "${roles[@]}"
    json="$(master_json)"
    alive="$(json_num aliveworkers <<<"$json")"
    if [[ -n "$json" && "${alive:-0}" -eq "$NUM_WORKERS" ]]; then
      log "cluster up: $MASTER_URL with $alive worker(s) of $WORKER_CORES core(s) and $WORKER_MEMORY each"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      tail_log "$(log_file master)" 30
      for ((n = 1; n <= NUM_WORKERS; n++)); do tail_log "$(log_file "worker$n")" 15; done
      local why="the Master does not answer at $JSON_URL"
      [[ -z "$json" ]] || why="alive workers ${alive:-?}, want $NUM_WORKERS"
      die "cluster not ready after ${UP_TIMEOUT}s: $why"
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------- commands

cmd_up() {
  need java "install openjdk-17-jre-headless"
  need curl
  valid_count
  HOME_DIR="$(spark_home)"
  mkdir -p "$LOG_DIR" "$PID_DIR" "$WORK_DIR"
  local role n
  for role in $(running_workers); do # more Workers than asked: stop the extra ones
    n="${role#worker}"
    if ((n > NUM_WORKERS)); then stop_role "$role"; fi
  done
  start_role master
  for ((n = 1; n <= NUM_WORKERS; n++)); do start_role "worker$n"; done
  log "waiting up to ${UP_TIMEOUT}s for $NUM_WORKERS worker(s) to register"
  wait_cluster
}

cmd_down() {
  local role stopped=0
  for role in $(running_workers | sort -rV) master; do
    stop_role "$role"
    stopped=$((stopped + STOPPED))
  done
  if ((stopped)); then log "stopped $stopped daemon(s)"; else log "nothing running"; fi
}

cmd_status() {
  valid_count
  local role pid rc=0 n roles=(master)
  for ((n = 1; n <= NUM_WORKERS; n++)); do roles+=("worker$n"); done
  for role in $(running_workers); do # extra Workers from an earlier, larger 'up', if running
    [[ " ${roles[*]} " == *" $role "* || -z "$(role_pid "$role")" ]] || roles+=("$role")
  done
  for role in "${roles[@]}"; do
    pid="$(role_pid "$role")"
    if [[ -n "$pid" ]]; then
      printf '%-8s running  pid %-8s %s\n' "$role" "$pid" "$(role_desc "$role")"
    else
      printf '%-8s stopped  pid %-8s %s\n' "$role" - "$(role_desc "$role")"
      rc=3
    fi
  done
  local json
  json="$(master_json)"
  if [[ -n "$json" ]]; then
    # the cluster's totals follow the "workers" list in the Master's JSON
    printf 'master: %s alive workers, %s cores\n' "$(json_num aliveworkers <<<"$json")" \
      "$(sed -n '/"aliveworkers"/,$p' <<<"$json" | json_num cores)"
  fi
  return "$rc"
}

cmd_env() {
  printf 'export PACS_SPARK_MASTER=%q\n' "$MASTER_URL"
  printf 'export SPARK_HOME=%q\n' "$(spark_home)"
}

cmd_clean() {
  cmd_down
  if [[ -d "$SPARK_DIR" ]]; then
    rm -rf "$SPARK_DIR"
    log "removed $SPARK_DIR"
  fi
}

main() {
  local cmd="${1:-help}"
  shift || true
  case "$cmd" in
    up | start) cmd_up ;;
    down | stop) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    clean) cmd_clean ;;
    help | -h | --help) usage ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
