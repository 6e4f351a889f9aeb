#!/usr/bin/env bash
# Install everything the tests need, start the real stack (HDFS with three
# DataNodes, Postgres), run the whole test suite, and stop the stack again —
# also when the tests fail.  The Spark standalone cluster (deploy/spark.sh)
# is started and stopped by its own integration test.  This is the README's
# test command; CI runs it.
#
#   bash deploy/test.sh [pytest args...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

LOG_TAG=test
source deploy/lib.sh # require_free_disk, die
log() { printf '\n== %s\n' "$*"; }

# A fresh .venv (torch with its CUDA libraries) is ~7 GiB; the stack and the
# test data a few more.  Failing here beats "No space left on device" in pip.
if [[ -x .venv/bin/python ]]; then require_free_disk . 4 "the test suite"; else require_free_disk . 12 "a fresh .venv and the test suite"; fi

log "system packages (Java, Maven, Postgres, dcmtk)"
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v storescu >/dev/null || need+=(dcmtk)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi

log "Python environment (.venv)"
bash deploy/install.sh

log "starting HDFS (NameNode + 3 DataNodes) and Postgres"
cleanup() {
  log "stopping the stack"
  bash deploy/hdfs.sh down || true
  bash deploy/postgres.sh down || true
  bash deploy/spark.sh down || true # started by tests/integration/test_spark_cluster.py; stopped there too
}
trap cleanup EXIT
bash deploy/hdfs.sh up
bash deploy/postgres.sh up
eval "$(bash deploy/hdfs.sh env)"
eval "$(bash deploy/postgres.sh env)"
export PACS_HDFS_URL PACS_HDFS_WEBHDFS_URL PACS_INDEX_URL
export PACS_REQUIRE_STACK=1

log "tests"
.venv/bin/python -m pytest -ra "$@"
