# Shared helpers for deploy/*.sh. Source it; do not run it.
# shellcheck shell=bash

PACS_REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACS_STACK_DIR="${PACS_STACK_DIR:-$PACS_REPO_DIR/.stack}"

log() { printf '[%s] %s\n' "${LOG_TAG:-stack}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-stack}" "$*" >&2; exit 1; }

# pid_alive PID [MARKER]: true if PID is a live process and, when MARKER is
# given, its command line contains MARKER (guards against PID reuse).
pid_alive() {
  local pid="$1" marker="${2:-}"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie is not alive.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 1
  if [[ -n "$marker" ]]; then
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$marker"* ]] || return 1
  fi
  return 0
}

# read_pid FILE: print the PID stored in FILE (first line), or nothing.
read_pid() { if [[ -f "$1" ]]; then head -n1 "$1" | tr -dc '0-9'; fi; }

# stop_pid PID TIMEOUT_S [SIGNAL]: send SIGNAL (default TERM), wait up to
# TIMEOUT_S for exit, then SIGKILL. Returns once the process is gone.
stop_pid() {
  local pid="$1" timeout="$2" sig="${3:-TERM}" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid did not exit after ${timeout}s of SIG$sig; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  die "pid $pid survived SIGKILL"
}

# port_listener PORT: print "pid/program" info of whoever listens on TCP PORT
# (any address); empty output if nobody does.
port_listener() {
  ss -Hltnp "sport = :$1" 2>/dev/null | head -n1
}

port_in_use() { [[ -n "$(port_listener "$1")" ]]; }

# tail_log FILE [N]: print the last N (default 40) lines of FILE to stderr.
tail_log() {
  local f="$1" n="${2:-40}"
  if [[ -f "$f" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2
    printf -- '-----\n' >&2
  else
    printf -- '(no log file %s)\n' "$f" >&2
  fi
}

# require_free_disk DIR GIB WHAT: die, naming the free space, if the file
# system holding DIR has less than GIB GiB free.  WHAT says what needs it.
require_free_disk() {
  local dir="$1" need_gib="$2" what="$3" free_kib
  free_kib="$(df -Pk "$dir" | awk 'NR == 2 {print $4}')"
  if ((free_kib < need_gib * 1024 * 1024)); then
    die "$what needs ${need_gib} GiB free on the file system of $dir; it has $((free_kib / 1024 / 1024)) GiB ($(df -Ph "$dir" | awk 'NR == 2 {print $6}')). Free some space (old HDFS data under ${PACS_STACK_DIR}/hdfs, pip caches) and run again."
  fi
}
