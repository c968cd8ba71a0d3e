#!/usr/bin/env bash
# Brings up the whole local Caracal stack — PostgreSQL, Redis, the tansu Kafka broker,
# the authz-service (with its Kafka relay), the three consumers (ledger-writer,
# audit-logger, metrics-aggregator), a mock OpenAI upstream and Envoy running the
# Caracal wasm filter — walks through the operator runbook with the `caracal` CLI,
# sends agent traffic through Envoy until the agent's budget refuses it, then shows
# the ledger: what the gateway charged, as the ledger-writer recorded it, with zero
# drift against the budget counters, and ends with a signed Merkle checkpoint, an
# inclusion proof of one of the demo agent's charges and its offline verification.
#   KEEP_RUNNING=1 bash scripts/run-stack.sh   leaves everything up afterwards
#   (Envoy on 127.0.0.1:8443, admin API on 127.0.0.1:50051, metrics on :9464,
#   consumers' /metrics on :9465 ledger-writer, :9466 audit-logger, :9467 aggregator).
# Database roles (README "Database roles"): the migrations run as the migrator (here the
# local cluster's superuser, CARACAL_MIGRATOR_URL), then each process connects as its own
# LOGIN user, a member of its group role: caracal_authz_svc, caracal_ledger_writer_svc,
# caracal_audit_logger_svc, caracal_audit_retention_job (password CARACAL_DB_PASSWORD).
# The consumers get no admin token; the metrics-aggregator no database at all.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE="$ROOT/.local"
mkdir -p "$STATE"

bash scripts/services.sh
command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname='caracal'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE caracal"

echo "== building (service, CLI, mock upstream, wasm filter)"
cargo build -q -p caracal-authz -p caracal-cli -p caracal-consumers
cargo build -q -p caracal-tests --bin mock-llm
cargo build -q -p caracal-filter --target wasm32-wasip1 --profile wasm
BIN="$ROOT/target/debug"

export CARACAL_ADMIN_TOKEN=${CARACAL_ADMIN_TOKEN:-dev-admin-token}
export CARACAL_API_KEY_PEPPER=${CARACAL_API_KEY_PEPPER:-dev-pepper}
# What the gateway (Envoy's filter) presents on the hot path; render.sh puts it in the
# filter config. Production uses mTLS and auth.gatewaySans instead.
export CARACAL_GATEWAY_TOKEN=${CARACAL_GATEWAY_TOKEN:-dev-gateway-token}
MIGRATOR_URL=${CARACAL_MIGRATOR_URL:-postgres://postgres@127.0.0.1:5432/caracal}
DB_PASSWORD=${CARACAL_DB_PASSWORD:-dev-db-password}
db_url() { echo "postgres://$1:$DB_PASSWORD@127.0.0.1:5432/caracal"; }
export CARACAL_GRPC_ADDR=127.0.0.1:50051 CARACAL_HTTP_ADDR=127.0.0.1:9464
export CARACAL_SERVER=http://127.0.0.1:50051

stop_pidfile() {
  if [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; then kill "$(cat "$1")"; sleep 1; fi
  rm -f "$1"
}
SERVICES="envoy mock ledger-writer audit-logger metrics-aggregator authz tansu"
for f in $SERVICES; do stop_pidfile "$STATE/$f.pid"; done

echo "== starting the tansu Kafka broker on 127.0.0.1:9092 (data: .local/tansu)"
mkdir -p "$STATE/tansu"
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
(cd "$STATE/tansu" && exec "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
  --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine sqlite://tansu.db) \
  >"$STATE/tansu.log" 2>&1 &
echo $! >"$STATE/tansu.pid"
for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.5; done
export CARACAL_KAFKA_BROKERS=127.0.0.1:9092

echo "== migrations as the migrator (it owns the schema), then one LOGIN user per process"
CARACAL_DATABASE_URL=$MIGRATOR_URL "$BIN/caracal-authz-service" --config authz-service/config.example.yaml \
  migrate >"$STATE/migrate.log" 2>&1 || { cat "$STATE/migrate.log" >&2; exit 1; }
# The migration created the group roles (NOLOGIN) and granted them what each process
# needs; the users only log in and inherit that.
for pair in caracal_authz_svc:caracal_authz caracal_ledger_writer_svc:caracal_ledger_writer \
  caracal_audit_logger_svc:caracal_audit_logger caracal_audit_retention_job:caracal_audit_retention; do
  user=${pair%%:*} group=${pair#*:}
  psql "$MIGRATOR_URL" -q -v ON_ERROR_STOP=1 <<SQL
DO \$\$ BEGIN
  IF to_regrole('$user') IS NULL THEN CREATE ROLE $user LOGIN; END IF;
END \$\$;
ALTER ROLE $user LOGIN PASSWORD '$DB_PASSWORD';
GRANT $group TO $user;
SQL
done
echo "users: caracal_authz_svc, caracal_ledger_writer_svc, caracal_audit_logger_svc, caracal_audit_retention_job"

echo "== starting caracal-authz-service as caracal_authz_svc (log: .local/authz.log)"
CARACAL_DATABASE_URL=$(db_url caracal_authz_svc) \
  "$BIN/caracal-authz-service" --config authz-service/config.example.yaml >"$STATE/authz.log" 2>&1 &
echo $! >"$STATE/authz.pid"
# One at a time, in SERVICES order (the broker last): SIGTERM, up to 5 s to finish,
# then SIGKILL. Sent all at once, a consumer still committing to a broker that was
# itself shutting down could outlive the script.
cleanup() {
  for f in $SERVICES; do
    [ -f "$STATE/$f.pid" ] || continue
    pid=$(cat "$STATE/$f.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  done
}
if [ "${KEEP_RUNNING:-0}" != 1 ]; then trap cleanup EXIT; fi
for _ in $(seq 1 60); do
  curl -fsS http://127.0.0.1:9464/health >/dev/null 2>&1 && break
  if ! kill -0 "$(cat "$STATE/authz.pid")" 2>/dev/null; then
    echo "caracal-authz-service exited; its log:" >&2; cat "$STATE/authz.log" >&2; exit 1
  fi
  sleep 0.5
done
curl -fsS http://127.0.0.1:9464/health; echo

echo "== starting the consumers, each its own group and database user, no admin token (logs: .local/<consumer>.log)"
port=9465
for c in ledger-writer audit-logger metrics-aggregator; do
  case $c in
    # The Merkle sequencer signs with a key kept in .local/merkle-keys (generated at
    # first start; a mounted secret in production), a checkpoint at least every 2 s.
    ledger-writer) db=(CARACAL_DATABASE_URL="$(db_url caracal_ledger_writer_svc)"
      CARACAL_LEDGER_WRITER_MERKLE_KEY_DIR="$STATE/merkle-keys"
      CARACAL_LEDGER_WRITER_MERKLE_BATCH_TIMEOUT_SECONDS=2) ;;
    audit-logger) db=(CARACAL_DATABASE_URL="$(db_url caracal_audit_logger_svc)") ;;
    *) db=() ;; # Redis only
  esac
  env -u CARACAL_ADMIN_TOKEN -u CARACAL_API_KEY_PEPPER -u CARACAL_GATEWAY_TOKEN -u CARACAL_DATABASE_URL \
    "${db[@]}" CARACAL_CONSUMER_RUN_MIGRATIONS=false CARACAL_CONSUMER_HTTP_ADDR=127.0.0.1:$port \
    "$BIN/caracal-consumers" --config consumers/config.example.yaml "$c" >"$STATE/$c.log" 2>&1 &
  echo $! >"$STATE/$c.pid"
  for _ in $(seq 1 60); do
    curl -fsS "http://127.0.0.1:$port/health/live" >/dev/null 2>&1 && break
    if ! kill -0 "$(cat "$STATE/$c.pid")" 2>/dev/null; then
      echo "$c exited; its log:" >&2; cat "$STATE/$c.log" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "$c: /health/live $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health/live"), metrics on :$port"
  port=$((port + 1))
done

caracal() { echo "\$ caracal $*" >&2; "$BIN/caracal" "$@"; }
# The database outlives Redis here (services.sh runs Redis without persistence): after
# a machine restart the budget state is lost and every call refused, as in production,
# until it is rebuilt from the ledger (README "Restore").
if ! caracal budget status; then
  echo "== Redis lost the budget state since the last run: rebuilding it from the ledger"
  caracal budget rebuild
fi
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

echo
echo "== gateway: mock OpenAI upstream on 127.0.0.1:9000, Envoy + caracal filter on 127.0.0.1:8443"
"$BIN/mock-llm" --port 9000 >"$STATE/mock.log" 2>&1 &
echo $! >"$STATE/mock.pid"
LISTEN_PORT=8443 ADMIN_PORT=9901 AUTHZ_PORT=50051 MOCK_PORT=9000 SECRETS_DIR="$STATE/secrets" \
  bash envoy/render.sh --upstream mock --out "$STATE/envoy.yaml" >/dev/null
ENVOY_BIN=$(find "$ROOT/.venv" -path '*envoy/_bin/envoy' -type f | head -n1)
"${ENVOY_BIN:-$ROOT/.venv/bin/envoy}" -c "$STATE/envoy.yaml" --log-level warn >"$STATE/envoy.log" 2>&1 &
echo $! >"$STATE/envoy.pid"
for _ in $(seq 1 120); do curl -fsS http://127.0.0.1:8443/health >/dev/null 2>&1 && break; sleep 0.5; done

echo "== a demo agent with a \$0.001 daily budget; gpt-4o at \$2.50 / \$10.00 per 1M tokens"
caracal pricebook set --provider openai --model gpt-4o --currency USD --input-price 2.50 --output-price 10.00 >/dev/null
demo="demo-gateway-$(date +%s)"
demo_id=$(caracal --output json agent create --name "$demo" --type openai | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
demo_key=$(caracal --output json agent key issue --agent-id "$demo_id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
caracal policy create --agent-id "$demo_id" --limit 0.001 --currency USD --time-window daily --window-type calendar >/dev/null
sleep 1.5 # the hot path's caches pick up admin changes within one poll (1 s)

echo "== agent traffic through Envoy (the agent holds only its Caracal key)"
charged=0 # micro-USD: what the gateway charged, from the provider's reported usage
for i in $(seq 1 15); do
  code=$(curl -s -o "$STATE/resp.json" -D "$STATE/resp.headers" -w '%{http_code}' \
    http://127.0.0.1:8443/v1/chat/completions \
    -H "authorization: Bearer $demo_key" -H 'content-type: application/json' \
    -d '{"model":"gpt-4o","max_tokens":40,"messages":[{"role":"user","content":"Say hello to the platform team"}]}')
  remaining=$(grep -i '^x-caracal-remaining-budget:' "$STATE/resp.headers" | tr -d '\r' | cut -d' ' -f2)
  if [ "$code" = 200 ]; then
    usage=$(python3 -c 'import json,sys; u=json.load(open(sys.argv[1]))["usage"]; print(u["prompt_tokens"], "prompt +", u["completion_tokens"], "completion tokens")' "$STATE/resp.json")
    # gpt-4o: $2.50 / $10.00 per 1M tokens = 2.5 / 10 micro-USD per token, rounded up once.
    cost=$(python3 -c 'import json,sys; u=json.load(open(sys.argv[1]))["usage"]; print(-(-(u["prompt_tokens"]*25 + u["completion_tokens"]*100)//10))' "$STATE/resp.json")
    charged=$((charged + cost))
    echo "call $i: HTTP 200 ($usage); remaining budget after reserving: \$$remaining"
  else
    echo "call $i: HTTP $code — refused: $(cat "$STATE/resp.json")"
    break
  fi
  sleep 0.3 # let Settle land before the next call, so the printed budget is exact
done
echo "== metrics: $(curl -s http://127.0.0.1:9464/metrics | grep -E '^caracal_requests_total' | tr '\n' ' ')"

echo
echo "== the ledger: waiting for the pipeline to drain (outbox -> Kafka -> ledger-writer)"
for _ in $(seq 1 60); do
  got=$(psql "$(db_url caracal_authz_svc)" -Atc \
    "SELECT coalesce(sum(charged_micros),0) FROM ledger_final_charges WHERE agent_id = '$demo_id'" 2>/dev/null || echo 0)
  [ "$got" = "$charged" ] && break
  sleep 0.5
done
today=$(date -u +%F)
caracal ledger query --agent-id "$demo_id" --start-date "$today" --end-date "$today"
caracal ledger summary --agent-id "$demo_id" --breakdown model
printf 'the gateway charged: $%d.%06d (from the provider-reported usage of each answered call)\n' \
  $((charged / 1000000)) $((charged % 1000000))
caracal ledger reconcile --agent-id "$demo_id"
echo "== is the ledger keeping up? (per partition: reader, committed/end offsets, lag)"
caracal ledger status --database-url "$(db_url caracal_authz_svc)" || echo "(ledger status exited $?)"
caracal spend trend --agent-id "$demo_id" --days 3
caracal dlq count
echo "== audit retention, as its own role (the audit-logger's may not delete; a CronJob in k8s)"
env -u CARACAL_ADMIN_TOKEN CARACAL_DATABASE_URL="$(db_url caracal_audit_retention_job)" CARACAL_CONSUMER_RUN_MIGRATIONS=false \
  "$BIN/caracal-consumers" --config consumers/config.example.yaml audit-retention 2>&1 | tail -n 1
echo "== the audit trail: $(psql "$MIGRATOR_URL" -Atc 'SELECT count(*) FROM audit_logs') messages, append-only:"
psql "$(db_url caracal_audit_logger_svc)" -Atc "DELETE FROM audit_logs" 2>&1 | sed 's/^/   caracal_audit_logger_svc: /' || true
echo "== the Merkle log: a signed checkpoint over the ledger, a proof of one of the demo agent's charges, verified offline"
for _ in $(seq 1 60); do
  covered=$(psql "$(db_url caracal_authz_svc)" -Atc \
    "SELECT checkpoint_size >= (SELECT count(*) FROM ledger_events) FROM merkle_state" 2>/dev/null || echo f)
  [ "$covered" = t ] && break
  sleep 0.5
done
caracal merkle checkpoint
event_id=$(psql "$(db_url caracal_authz_svc)" -Atc \
  "SELECT event_id FROM ledger_events WHERE agent_id = '$demo_id' ORDER BY occurred_at DESC LIMIT 1")
caracal merkle prove --event-id "$event_id" --out "$STATE/proof.json"
caracal merkle export-public-key --out "$STATE/merkle-public.pem"
echo "(offline: no server, no database)"
caracal merkle verify-proof "$STATE/proof.json" --public-key "$STATE/merkle-public.pem"
caracal merkle verify-range --start "$today" --end "$today"
echo "== consumers: $(curl -s http://127.0.0.1:9465/metrics | grep -E '^caracal_consumer_events_processed_total' | tr '\n' ' ')"
echo "== done. Envoy on 127.0.0.1:8443, admin API on 127.0.0.1:50051 (token: $CARACAL_ADMIN_TOKEN), metrics on http://127.0.0.1:9464/metrics"
