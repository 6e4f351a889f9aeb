#!/usr/bin/env bash
# Local HDFS cluster for development and tests: one NameNode and three
# DataNodes, each its own JVM, bound to 127.0.0.1 only. Hadoop 3.5.0 server
# jars are resolved from Maven Central (deploy/hadoop/pom.xml); runtime files
# live under ${PACS_STACK_DIR:-<repo>/.stack}.
set -euo pipefail

LOG_TAG=hdfs
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: deploy/hdfs.sh COMMAND [ARGS]

Commands:
  fetch               resolve the Hadoop ${HADOOP_VERSION} jars from Maven Central into
                      \$PACS_STACK_DIR/hadoop-${HADOOP_VERSION}/lib (skipped when already complete)
  up | start          fetch if needed, write the config, format the NameNode if its name
                      dir is new, start the NameNode and 3 DataNodes (only those not
                      running) and wait until 3 DataNodes are live and safemode is off
  down | stop         stop all daemons (TERM, then KILL after ${STOP_TIMEOUT}s)
  status              one line per daemon; exit 0 if all four run, 3 otherwise
  stop-datanode N [--kill]
                      stop DataNode N (1..3) with TERM, or SIGKILL with --kill
  start-datanode N    start DataNode N and wait until it has registered
  env                 print export lines for the Python code (PACS_HDFS_URL, ...)
  clean               down, then delete \$PACS_STACK_DIR/hdfs (all HDFS data)
  help                this text

Environment (defaults):
  PACS_STACK_DIR            $PACS_STACK_DIR
  PACS_HDFS_NN_PORT         NameNode RPC port (19000)
  PACS_HDFS_HTTP_PORT       NameNode HTTP/WebHDFS port (19870)
  PACS_HDFS_DN_DATA_PORT    DataNode 1 data-transfer port (19866)
  PACS_HDFS_DN_HTTP_PORT    DataNode 1 HTTP port (19864)
  PACS_HDFS_DN_IPC_PORT     DataNode 1 IPC port (19867)
  PACS_HDFS_DN_HTTPS_PORT   DataNode 1 HTTPS port, configured but unused (19865)
  PACS_HDFS_DN_PORT_STRIDE  DataNode N uses the ports above + (N-1)*stride (10)
  PACS_HDFS_NN_HEAP         NameNode -Xmx (512m)
  PACS_HDFS_DN_HEAP         DataNode -Xmx (384m)
  PACS_HDFS_SYNC_ON_CLOSE   dfs.datanode.synconclose: fsync block files on close (true)
  PACS_HDFS_AVOID_STALE     avoid DataNodes silent for >3 s when placing/reading (true)
  PACS_HDFS_CLOSE_COMMITTED dfs.namenode.file.close.num-committed-allowed (0)
  PACS_HDFS_UP_TIMEOUT      seconds 'up' waits for the cluster (180)
EOF
}

HADOOP_VERSION=3.5.0
HADOOP_DIR="$PACS_STACK_DIR/hadoop-$HADOOP_VERSION"
HADOOP_LIB="$HADOOP_DIR/lib"
HADOOP_WEBROOT="$HADOOP_DIR/webroot" # holds webapps/<name>/ for HttpServer2
FETCH_MARKER="$HADOOP_DIR/.fetch-complete"
POM="$PACS_REPO_DIR/deploy/hadoop/pom.xml"

HDFS_DIR="$PACS_STACK_DIR/hdfs"
CONF_DIR="$HDFS_DIR/conf"
NAME_DIR="$HDFS_DIR/name"
LOG_DIR="$HDFS_DIR/logs"
PID_DIR="$HDFS_DIR/pids"

NN_PORT="${PACS_HDFS_NN_PORT:-19000}"
HTTP_PORT="${PACS_HDFS_HTTP_PORT:-19870}"
DN_DATA_PORT="${PACS_HDFS_DN_DATA_PORT:-19866}"
DN_HTTP_PORT="${PACS_HDFS_DN_HTTP_PORT:-19864}"
DN_IPC_PORT="${PACS_HDFS_DN_IPC_PORT:-19867}"
DN_HTTPS_PORT="${PACS_HDFS_DN_HTTPS_PORT:-19865}"
DN_STRIDE="${PACS_HDFS_DN_PORT_STRIDE:-10}"
NN_HEAP="${PACS_HDFS_NN_HEAP:-512m}"
DN_HEAP="${PACS_HDFS_DN_HEAP:-384m}"
SYNC_ON_CLOSE="${PACS_HDFS_SYNC_ON_CLOSE:-true}"
AVOID_STALE="${PACS_HDFS_AVOID_STALE:-true}"
CLOSE_COMMITTED="${PACS_HDFS_CLOSE_COMMITTED:-0}"
UP_TIMEOUT="${PACS_HDFS_UP_TIMEOUT:-180}"
STOP_TIMEOUT=30
NUM_DN=3
ROLES=(nn dn1 dn2 dn3)

JMX_URL="http://127.0.0.1:$HTTP_PORT/jmx"

# Java 17 module flags: Spark's launcher list plus what Hadoop's own scripts add.
JAVA_MODULE_OPTS=(
  -XX:+IgnoreUnrecognizedVMOptions
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.lang.invoke=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens=java.base/java.util.regex=ALL-UNNAMED
  --add-opens=java.base/java.util.zip=ALL-UNNAMED
  --add-opens=java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens=java.base/jdk.internal.misc=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/sun.nio.cs=ALL-UNNAMED
  --add-opens=java.base/sun.net.dns=ALL-UNNAMED
  --add-opens=java.base/sun.net.util=ALL-UNNAMED
  --add-opens=java.base/sun.security.action=ALL-UNNAMED
  --add-opens=java.base/sun.security.x509=ALL-UNNAMED
  --add-opens=java.base/sun.util.calendar=ALL-UNNAMED
  --add-exports=java.base/sun.net.dns=ALL-UNNAMED
  --add-exports=java.base/sun.net.util=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
)

# ---------------------------------------------------------------- helpers

dn_data_port() { echo $((DN_DATA_PORT + ($1 - 1) * DN_STRIDE)); }
dn_http_port() { echo $((DN_HTTP_PORT + ($1 - 1) * DN_STRIDE)); }
dn_ipc_port() { echo $((DN_IPC_PORT + ($1 - 1) * DN_STRIDE)); }
dn_https_port() { echo $((DN_HTTPS_PORT + ($1 - 1) * DN_STRIDE)); }

role_ports() { # ports a role listens on
  case "$1" in
    nn) echo "$NN_PORT $HTTP_PORT" ;;
    dn[1-3]) local n="${1#dn}"; echo "$(dn_data_port "$n") $(dn_http_port "$n") $(dn_ipc_port "$n")" ;;
  esac
}

role_desc() {
  case "$1" in
    nn) echo "rpc 127.0.0.1:$NN_PORT http 127.0.0.1:$HTTP_PORT" ;;
    dn[1-3]) local n="${1#dn}"
      echo "data 127.0.0.1:$(dn_data_port "$n") http 127.0.0.1:$(dn_http_port "$n") ipc 127.0.0.1:$(dn_ipc_port "$n")" ;;
  esac
}

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }
# Unique string on each daemon's command line, checked before trusting a PID.
marker() { echo "-Dpacs.daemon=hdfs-$1@$PACS_STACK_DIR"; }

role_pid() { # print the PID of a running role, or nothing
  local pid
  pid="$(read_pid "$(pid_file "$1")")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "$(marker "$1")"; then echo "$pid"; fi
}

valid_dn() { [[ "${1:-}" =~ ^[1-3]$ ]] || die "DataNode number must be 1, 2 or 3 (got '${1:-}')"; }

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH${2:+ ($2)}"; }

jmx_state() { # FSNamesystemState JSON, or nothing if the NameNode does not answer
  curl -sf --max-time 3 "$JMX_URL?qry=Hadoop:service=NameNode,name=FSNamesystemState" 2>/dev/null || true
}
# Tiny JSON field readers (no jq needed); print nothing when the field is absent.
json_num() { { grep -o "\"$1\" *: *[0-9]*" | grep -o '[0-9]*$' | head -n1; } || true; }
json_str() { { grep -o "\"$1\" *: *\"[^\"]*\"" | sed 's/.*: *"\(.*\)"/\1/' | head -n1; } || true; }

# ---------------------------------------------------------------- fetch

cmd_fetch() {
  need mvn "install maven"
  local sum
  sum="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$FETCH_MARKER" && "$(cat "$FETCH_MARKER")" == "$sum" && -d "$HADOOP_LIB" ]]; then
    log "Hadoop $HADOOP_VERSION jars already in $HADOOP_LIB ($(find "$HADOOP_LIB" -name '*.jar' | wc -l) jars)"
    return 0
  fi
  mkdir -p "$HADOOP_DIR"
  local tmp="$HADOOP_DIR/lib.tmp"
  rm -rf "$tmp"
  log "resolving Hadoop $HADOOP_VERSION jars from Maven Central (cached in ~/.m2) ..."
  local mvnlog="$HADOOP_DIR/mvn.log"
  if ! mvn -B -q -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
    tail_log "$mvnlog" 30
    die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"
  fi
  local j
  for j in hadoop-common hadoop-hdfs hadoop-hdfs-client; do
    [[ -f "$tmp/$j-$HADOOP_VERSION.jar" ]] || die "$j-$HADOOP_VERSION.jar missing after mvn"
  done
  rm -rf "$HADOOP_LIB"
  mv "$tmp" "$HADOOP_LIB"
  # The hadoop-hdfs jar on Maven Central has no webapps/ folder (the binary
  # tarball ships it separately), but HttpServer2 requires webapps/<name> on
  # the classpath. WebHDFS and /jmx are registered in code, so an empty web
  # app with a web.xml is enough.
  local app
  for app in hdfs datanode secondary journal; do
    mkdir -p "$HADOOP_WEBROOT/webapps/$app/WEB-INF"
    cat >"$HADOOP_WEBROOT/webapps/$app/WEB-INF/web.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<web-app xmlns="http://java.sun.com/xml/ns/javaee" version="2.5"/>
EOF
    echo "<html><body>pacs dev HDFS ($app)</body></html>" >"$HADOOP_WEBROOT/webapps/$app/index.html"
  done
  echo "$sum" >"$FETCH_MARKER"
  log "fetched $(find "$HADOOP_LIB" -name '*.jar' | wc -l) jars into $HADOOP_LIB"
}

# ---------------------------------------------------------------- config

prop() { printf '  <property><name>%s</name><value>%s</value></property>\n' "$1" "$2"; }

write_config() {
  mkdir -p "$CONF_DIR" "$LOG_DIR" "$PID_DIR" "$HDFS_DIR/tmp"
  {
    echo '<?xml version="1.0"?>'
    echo '<!-- Generated by deploy/hdfs.sh; edits are overwritten by "up". -->'
    echo '<configuration>'
    prop fs.defaultFS "hdfs://127.0.0.1:$NN_PORT"
    prop hadoop.tmp.dir "$HDFS_DIR/tmp"
    prop hadoop.security.authentication simple
    echo '</configuration>'
  } >"$CONF_DIR/core-site.xml"
  {
    echo '<?xml version="1.0"?>'
    echo '<!-- Generated by deploy/hdfs.sh; edits are overwritten by "up". -->'
    echo '<!-- Per-DataNode settings (data dir, ports) are passed as -D on the command line. -->'
    echo '<configuration>'
    prop dfs.namenode.name.dir "file://$NAME_DIR"
    prop dfs.namenode.rpc-address "127.0.0.1:$NN_PORT"
    prop dfs.namenode.rpc-bind-host 127.0.0.1
    prop dfs.namenode.servicerpc-bind-host 127.0.0.1
    prop dfs.namenode.lifeline.rpc-bind-host 127.0.0.1
    prop dfs.namenode.http-address "127.0.0.1:$HTTP_PORT"
    prop dfs.namenode.http-bind-host 127.0.0.1
    prop dfs.namenode.https-address "127.0.0.1:$((HTTP_PORT + 1))"
    prop dfs.namenode.https-bind-host 127.0.0.1
    prop dfs.http.policy HTTP_ONLY
    prop dfs.webhdfs.enabled true
    prop dfs.permissions.enabled false
    prop dfs.replication 3
    prop dfs.namenode.safemode.extension 0
    prop dfs.namenode.datanode.registration.ip-hostname-check false
    # Dead after 2 * recheck + 10 * heartbeat = 5 s + 10 s = 15 s.
    prop dfs.heartbeat.interval 1
    prop dfs.namenode.heartbeat.recheck-interval 2500
    # Stale (no heartbeat for 3 s): sorted last for reads, avoided for new blocks
    # -- but with 3 DataNodes and replication 3 the NameNode falls back to the
    # stale node when it cannot find 3 others, so writes still get it until it
    # is declared dead.
    prop dfs.namenode.stale.datanode.interval 3000
    prop dfs.namenode.avoid.write.stale.datanode "$AVOID_STALE"
    prop dfs.namenode.avoid.read.stale.datanode "$AVOID_STALE"
    prop dfs.datanode.hostname 127.0.0.1
    # Placement skips a DataNode serving more than twice the average number of
    # transfers. With three nodes and a handful of open packs that average is
    # below 1, so a node with one open pack was skipped and new packs were
    # written (and acknowledged) on two replicas. Every node is needed here.
    prop dfs.namenode.redundancy.considerLoad false
    prop dfs.datanode.synconclose "$SYNC_ON_CLOSE"
    # Number of last blocks that may still be COMMITTED (acknowledged by the
    # whole pipeline, not yet reported by a DataNode) when a file is closed.
    # 0 (Hadoop's default) makes close() poll complete() until a block report
    # arrives, which often costs a client-side retry sleep of 0.4-0.5 s.
    prop dfs.namenode.file.close.num-committed-allowed "$CLOSE_COMMITTED"
    # Client side (also used by the DataNodes' WebHDFS writers): with 3 nodes
    # and one dead there is no replacement node; keep writing on the survivors.
    prop dfs.client.block.write.replace-datanode-on-failure.enable true
    prop dfs.client.block.write.replace-datanode-on-failure.policy DEFAULT
    prop dfs.client.block.write.replace-datanode-on-failure.best-effort true
    echo '</configuration>'
  } >"$CONF_DIR/hdfs-site.xml"
  cat >"$CONF_DIR/log4j.properties" <<'EOF'
# Generated by deploy/hdfs.sh. Daemons log to stderr, redirected to logs/<role>.log.
log4j.rootLogger=INFO,console
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{ISO8601} %p %c{2}: %m%n
log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR
# One line per namespace operation / per block transfer: too chatty here.
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode.clienttrace=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.BlockStateChange=WARN
log4j.logger.http.requests=WARN
EOF
}

java_cmd() { # java_cmd ROLE HEAP MAINCLASS -> prints nothing; sets JAVA_ARGS
  local role="$1" heap="$2" main="$3"
  JAVA_ARGS=(
    "-Xmx$heap" -XX:+UseSerialGC
    "${JAVA_MODULE_OPTS[@]}"
    -Djava.net.preferIPv4Stack=true
    "-Dhadoop.home.dir=$HADOOP_DIR"
    "-Dhadoop.log.dir=$LOG_DIR"
    "-Dhadoop.log.file=$role.log"
    "-Dhadoop.id.str=$(id -un)"
    "-Dlog4j.configuration=file:$CONF_DIR/log4j.properties"
    "$(marker "$role")"
    -cp "$CONF_DIR:$HADOOP_WEBROOT:$HADOOP_LIB/*"
    "$main"
  )
}

format_if_new() {
  if [[ -f "$NAME_DIR/current/VERSION" ]]; then return 0; fi
  log "new name dir: formatting the NameNode"
  local n
  for n in 1 2 3; do # blocks of a namespace that no longer exists
    if [[ -d "$HDFS_DIR/dn$n" ]]; then
      log "removing $HDFS_DIR/dn$n (belongs to the previous namespace)"
      rm -rf "$HDFS_DIR/dn$n"
    fi
  done
  mkdir -p "$NAME_DIR"
  java_cmd nn-format "$NN_HEAP" org.apache.hadoop.hdfs.server.namenode.NameNode
  if ! java "${JAVA_ARGS[@]}" -format -force -nonInteractive -clusterid pacs-dev \
    </dev/null >"$(log_file nn-format)" 2>&1; then
    tail_log "$(log_file nn-format)"
    rm -rf "$NAME_DIR"
    die "NameNode format failed"
  fi
  [[ -f "$NAME_DIR/current/VERSION" ]] || { tail_log "$(log_file nn-format)"; die "format left no $NAME_DIR/current/VERSION"; }
}

# start_role ROLE: launch the daemon unless it already runs. Sets STARTED=1
# if it was started, 0 if it was already running. (Not used as an "if"
# condition, which would disable set -e inside it.)
start_role() {
  local role="$1" pid port heap main extra=()
  STARTED=0
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
    nn) heap="$NN_HEAP"; main=org.apache.hadoop.hdfs.server.namenode.NameNode ;;
    dn[1-3])
      local n="${role#dn}"
      heap="$DN_HEAP"; main=org.apache.hadoop.hdfs.server.datanode.DataNode
      mkdir -p "$HDFS_DIR/$role"
      extra=(
        -D "dfs.datanode.data.dir=file://$HDFS_DIR/$role"
        -D "dfs.datanode.address=127.0.0.1:$(dn_data_port "$n")"
        -D "dfs.datanode.http.address=127.0.0.1:$(dn_http_port "$n")"
        -D "dfs.datanode.ipc.address=127.0.0.1:$(dn_ipc_port "$n")"
        -D "dfs.datanode.https.address=127.0.0.1:$(dn_https_port "$n")"
      ) ;;
  esac
  java_cmd "$role" "$heap" "$main"
  local log
  log="$(log_file "$role")"
  printf '===== %s starting %s =====\n' "$(date -Is)" "$role" >>"$log"
  # setsid: the daemon gets its own session, so it outlives this shell and
  # its process group. In a non-interactive shell the background child is not
  # a group leader, so setsid execs java without forking: $! is the JVM.
  (cd "$HDFS_DIR" && exec setsid java "${JAVA_ARGS[@]}" "${extra[@]}" </dev/null >>"$log" 2>&1) &
  pid=$!
  sleep 0.2
  if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != */java ]]; then
    local child
    child="$(pgrep -P "$pid" | head -n1 || true)"
    [[ -n "$child" ]] && pid="$child"
  fi
  echo "$pid" >"$(pid_file "$role")"
  log "started $role (pid $pid): $(role_desc "$role")"
  STARTED=1
}

stop_role() { # stop_role ROLE [SIGNAL]; sets STOPPED=1 if it was running
  local role="$1" sig="${2:-TERM}" pid
  STOPPED=0
  pid="$(role_pid "$role")"
  if [[ -n "$pid" ]]; then
    log "stopping $role (pid $pid, SIG$sig)"
    stop_pid "$pid" "$STOP_TIMEOUT" "$sig"
    STOPPED=1
  fi
  rm -f "$(pid_file "$role")"
}

# Byte offset (1-based, for tail -c +N) at which a DataNode's log of the
# current run starts; registration is looked for after it.
declare -A LOG_OFFSET=()
mark_log() { LOG_OFFSET[$1]=$(($(stat -c %s "$(log_file "$1")" 2>/dev/null || echo 0) + 1)); }
dn_registered() { # true once this run of the DataNode logged its NN registration
  grep -q 'successfully registered with NN' < <(tail -c "+${LOG_OFFSET[$1]:-1}" "$(log_file "$1")" 2>/dev/null)
}

check_alive_or_die() { # used while waiting: a daemon that exited is fatal
  local role
  for role in "$@"; do
    if [[ -z "$(role_pid "$role")" ]]; then
      tail_log "$(log_file "$role")" 60
      die "$role exited during startup (log above: $(log_file "$role"))"
    fi
  done
}

wait_cluster() { # wait until NN answers, safemode is off and NUM_DN DataNodes are live
  local deadline=$((SECONDS + UP_TIMEOUT)) state live fsstate why role pending
  while :; do
    check_alive_or_die "${ROLES[@]}"
    pending=""
    for role in "${!LOG_OFFSET[@]}"; do dn_registered "$role" || pending+=" $role"; done
    state="$(jmx_state)"
    live="$(json_num NumLiveDataNodes <<<"$state")"
    fsstate="$(json_str FSState <<<"$state")"
    if [[ -z "$pending" && -n "$state" && "${live:-0}" -ge "$NUM_DN" && "$fsstate" == Operational ]] &&
      curl -sf --max-time 3 -o /dev/null "http://127.0.0.1:$HTTP_PORT/webhdfs/v1/?op=GETFILESTATUS"; then
      log "cluster up: $live live DataNodes, safemode off, WebHDFS http://127.0.0.1:$HTTP_PORT"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      if [[ -z "$state" ]]; then why="NameNode JMX at $JMX_URL does not answer"; else
        why="live DataNodes=${live:-?} (want $NUM_DN), FSState=${fsstate:-?}${pending:+, not registered:$pending}"; fi
      tail_log "$(log_file nn)" 40
      for role in dn1 dn2 dn3; do tail_log "$(log_file "$role")" 15; done
      die "cluster not ready after ${UP_TIMEOUT}s: $why"
    fi
    sleep 1
  done
}

# ---------------------------------------------------------------- commands

cmd_up() {
  need java "install openjdk-17-jre-headless"
  need curl
  local role started=0
  local all_up=1
  for role in "${ROLES[@]}"; do [[ -n "$(role_pid "$role")" ]] || all_up=0; done
  if ((all_up)); then
    log "already up ($(for r in "${ROLES[@]}"; do printf '%s=%s ' "$r" "$(role_pid "$r")"; done| sed 's/ $//'))"
    wait_cluster
    return 0
  fi
  cmd_fetch
  write_config
  [[ -n "$(role_pid nn)" ]] || format_if_new
  for role in "${ROLES[@]}"; do
    [[ "$role" == nn ]] || mark_log "$role"
    start_role "$role"
    ((STARTED)) || [[ "$role" == nn ]] || unset "LOG_OFFSET[$role]"
    started=$((started + STARTED))
  done
  log "started $started daemon(s); waiting up to ${UP_TIMEOUT}s for the cluster"
  wait_cluster
}

cmd_down() {
  local role stopped=0
  for role in dn3 dn2 dn1 nn; do
    stop_role "$role"
    stopped=$((stopped + STOPPED))
  done
  if ((stopped)); then log "stopped $stopped daemon(s)"; else log "nothing running"; fi
}

cmd_status() {
  local role pid all=0
  for role in "${ROLES[@]}"; do
    pid="$(role_pid "$role")"
    if [[ -n "$pid" ]]; then
      printf '%-4s running  pid %-8s %s\n' "$role" "$pid" "$(role_desc "$role")"
    else
      printf '%-4s stopped  pid %-8s %s\n' "$role" - "$(role_desc "$role")"
      all=3
    fi
  done
  local state
  state="$(jmx_state)"
  if [[ -n "$state" ]]; then
    printf 'namenode: FSState=%s live DataNodes=%s dead DataNodes=%s\n' \
      "$(json_str FSState <<<"$state")" "$(json_num NumLiveDataNodes <<<"$state")" \
      "$(json_num NumDeadDataNodes <<<"$state")"
  fi
  return "$all"
}

cmd_stop_datanode() {
  valid_dn "${1:-}"
  local sig=TERM
  [[ "${2:-}" == "--kill" ]] && sig=KILL
  [[ -z "${2:-}" || "${2:-}" == "--kill" ]] || die "unknown option '${2}' (only --kill)"
  stop_role "dn$1" "$sig"
  ((STOPPED)) || log "dn$1 was not running"
}

cmd_start_datanode() {
  valid_dn "${1:-}"
  local role="dn$1" n="$1"
  [[ -d "$HADOOP_LIB" && -f "$CONF_DIR/hdfs-site.xml" ]] || die "cluster never set up; run 'deploy/hdfs.sh up'"
  write_config
  mark_log "$role"
  start_role "$role"
  ((STARTED)) || return 0
  local deadline=$((SECONDS + 90))
  while :; do
    check_alive_or_die "$role"
    if dn_registered "$role"; then
      log "$role registered with the NameNode"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      tail_log "$(log_file "$role")" 40
      die "$role did not register within 90s"
    fi
    sleep 0.5
  done
}

cmd_env() {
  printf 'export PACS_HDFS_URL=%q\n' "hdfs://127.0.0.1:$NN_PORT"
  printf 'export PACS_HDFS_WEBHDFS_URL=%q\n' "http://127.0.0.1:$HTTP_PORT"
  printf 'export PACS_STACK_DIR=%q\n' "$PACS_STACK_DIR"
}

cmd_clean() {
  cmd_down
  if [[ -d "$HDFS_DIR" ]]; then
    rm -rf "$HDFS_DIR"
    log "removed $HDFS_DIR"
  fi
}

main() {
  local cmd="${1:-help}"
  shift || true
  case "$cmd" in
    fetch) cmd_fetch ;;
    up | start) cmd_up ;;
    down | stop) cmd_down ;;
    status) cmd_status ;;
    stop-datanode) cmd_stop_datanode "$@" ;;
    start-datanode) cmd_start_datanode "$@" ;;
    env) cmd_env ;;
    clean) cmd_clean ;;
    help | -h | --help) usage ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
