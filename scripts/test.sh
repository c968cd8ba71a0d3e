#!/usr/bin/env bash
# The test suite: formatting, lints, then every test of the workspace against real
# PostgreSQL (and, as issues land, Redis, the tansu broker and Envoy).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
bash scripts/check-deploy.sh

# Databases left by an interrupted earlier run (each test makes its own).
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'caracal_test_%'" 2>/dev/null |
  while read -r db; do
    [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true
  done

# Login roles left by an interrupted earlier run (the role tests make their own).
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT rolname FROM pg_roles WHERE rolname LIKE 'caracal_test_%'" 2>/dev/null |
  while read -r role; do
    [ -n "$role" ] && psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP OWNED BY \"$role\"; DROP ROLE IF EXISTS \"$role\"" >/dev/null 2>&1 || true
  done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked 2>&1 | tee /tmp/caracal-test.log
