#!/usr/bin/env bash
# Runs every flowfarm test from a clean clone: makes sure Postgres and Redis
# run (starting them, or installing them from Debian packages when missing)
# and that an S3-compatible test server is built,
# builds every binary, then runs the whole test suite.
#
# Environment:
#   FLOWFARM_TEST_DATABASE_URL  Postgres server tests create their databases on
#                               (default postgres://postgres@127.0.0.1:5432/postgres)
#   FLOWFARM_TEST_REDIS_URL     Redis server (default redis://127.0.0.1:6379)
#   FLOWFARM_TEST_S3S_FS        s3s-fs binary (default: installed into ~/.cache/flowfarm/tools)
set -euo pipefail
cd "$(dirname "$0")/.."

export FLOWFARM_TEST_DATABASE_URL=${FLOWFARM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export FLOWFARM_TEST_REDIS_URL=${FLOWFARM_TEST_REDIS_URL:-redis://127.0.0.1:6379}

say() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  if ! command -v apt-get >/dev/null; then
    say "cannot install $* here (no apt-get): install it yourself, or point the FLOWFARM_TEST_* variables at running servers"
    exit 1
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing $* from Debian packages"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

postgres_up() { pg_isready -q -d "$FLOWFARM_TEST_DATABASE_URL" 2>/dev/null; }

ensure_postgres() {
  command -v pg_isready >/dev/null || apt_install postgresql postgresql-client
  if postgres_up; then return; fi
  say "starting Postgres"
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1 && [ -n "$(ls /etc/postgresql)" ]; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  else
    apt_install postgresql
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 30); do postgres_up && return; sleep 1; done
  say "Postgres is not answering at $FLOWFARM_TEST_DATABASE_URL"
  exit 1
}

redis_up() { redis-cli -u "$FLOWFARM_TEST_REDIS_URL" ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  # The farm tests also start private redis-server processes of their own.
  command -v redis-cli >/dev/null && command -v redis-server >/dev/null || apt_install redis-server redis-tools
  if redis_up; then return; fi
  say "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 30); do redis_up && return; sleep 1; done
  say "Redis is not answering at $FLOWFARM_TEST_REDIS_URL"
  exit 1
}

# The results-store tests run an S3-compatible server: s3s-fs (S3 over a
# folder), built once from crates.io into ~/.cache/flowfarm/tools.
ensure_s3s_fs() {
  if [ -n "${FLOWFARM_TEST_S3S_FS:-}" ]; then return; fi
  local root="$HOME/.cache/flowfarm/tools"
  if [ ! -x "$root/bin/s3s-fs" ]; then
    say "installing s3s-fs 0.14.1 (an S3-compatible server) for the results-store tests"
    cargo install --locked --quiet s3s-fs@0.14.1 --features binary --root "$root" \
      --target-dir "${CARGO_TARGET_DIR:-target}/tools"
  fi
  export FLOWFARM_TEST_S3S_FS="$root/bin/s3s-fs"
}

# The status page's test drives a headless Chromium.
ensure_chromium() {
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || apt_install chromium
}

ensure_postgres
ensure_redis
ensure_s3s_fs
ensure_chromium

say "checking the declared rust-version against the dependencies"
python3 scripts/check-msrv.py

if cargo fmt --version >/dev/null 2>&1; then
  say "checking formatting (cargo fmt --check)"
  cargo fmt --check
fi

say "building (every binary: the end-to-end tests run them)"
cargo build --locked --workspace --bins --tests

if cargo clippy --version >/dev/null 2>&1; then
  say "linting (cargo clippy, warnings are errors)"
  cargo clippy --locked --workspace --all-targets -- -D warnings
fi

say "testing"
cargo test --locked --workspace

# promtool checks the Prometheus config and alert rules of deploy/.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
  apt_install prometheus
fi
say "checking deploy/ (renders the manifests, matches them against the code)"
bash deploy/check.sh
