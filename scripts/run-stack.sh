#!/usr/bin/env bash
# Brings up the local Caracal stack and walks through the operator runbook.
#   KEEP_RUNNING=1 bash scripts/run-stack.sh   leaves the service up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE="$ROOT/.local"
mkdir -p "$STATE"

bash scripts/services.sh
command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname='caracal'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE caracal"

echo "== building"
cargo build -q -p caracal-authz -p caracal-cli
BIN="$ROOT/target/debug"

export CARACAL_ADMIN_TOKEN=${CARACAL_ADMIN_TOKEN:-dev-admin-token}
export CARACAL_API_KEY_PEPPER=${CARACAL_API_KEY_PEPPER:-dev-pepper}
export CARACAL_DATABASE_URL=${CARACAL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/caracal}
export CARACAL_GRPC_ADDR=127.0.0.1:50051 CARACAL_HTTP_ADDR=127.0.0.1:9464
export CARACAL_SERVER=http://127.0.0.1:50051

stop_pidfile() {
  if [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; then kill "$(cat "$1")"; sleep 1; fi
  rm -f "$1"
}
stop_pidfile "$STATE/authz.pid"
stop_pidfile "$STATE/tansu.pid"

echo "== starting the tansu Kafka broker on 127.0.0.1:9092 (data: .local/tansu)"
mkdir -p "$STATE/tansu"
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
(cd "$STATE/tansu" && exec "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
  --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine sqlite://tansu.db) \
  >"$STATE/tansu.log" 2>&1 &
echo $! >"$STATE/tansu.pid"
for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.5; done
export CARACAL_KAFKA_BROKERS=127.0.0.1:9092
echo "== starting caracal-authz-service (log: .local/authz.log)"
"$BIN/caracal-authz-service" --config authz-service/config.example.yaml >"$STATE/authz.log" 2>&1 &
echo $! >"$STATE/authz.pid"
cleanup() {
  for f in authz tansu; do
    [ -f "$STATE/$f.pid" ] && kill "$(cat "$STATE/$f.pid")" 2>/dev/null || true
  done
}
if [ "${KEEP_RUNNING:-0}" != 1 ]; then trap cleanup EXIT; fi
for _ in $(seq 1 60); do
  curl -fsS http://127.0.0.1:9464/health >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS http://127.0.0.1:9464/health; echo

caracal() { echo "\$ caracal $*" >&2; "$BIN/caracal" "$@"; }
name="demo-agent-$(date +%s)"
agent_id=$(caracal --output json agent create --name "$name" --type openai \
  --metadata '{"team":"platform","env":"dev"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "agent id: $agent_id"
caracal agent key issue --agent-id "$agent_id"
caracal policy create --agent-id "$agent_id" --limit 1000.00 --currency USD --time-window daily --window-type calendar
caracal policy create --agent-id "$agent_id" --limit 20000.00 --currency USD --time-window monthly --window-type calendar
caracal policy list --agent-id "$agent_id"
caracal pricebook set --provider openai --model gpt-4o-mini --currency USD --input-price 0.15 --output-price 0.60 --cached-input-price 0.075
caracal pricebook list
echo "== a bad limit is refused plainly:"
caracal policy create --agent-id "$agent_id" --limit 1.0000001 --currency USD --time-window daily --window-type calendar || true
echo "== done. Admin API on 127.0.0.1:50051 (token: $CARACAL_ADMIN_TOKEN), metrics on http://127.0.0.1:9464/metrics"
