#!/usr/bin/env bash
# Renders a Caracal Envoy template (envoy.yaml, envoy-tls.yaml, envoy-ext-authz.yaml)
# and writes the file-based SDS secrets holding the PROVIDER keys.
#
#   envoy/render.sh [--upstream real|mock] [--template FILE] [--out FILE] [--validate]
#   envoy/render.sh --gen-dev-certs          # self-signed CA + certs in $TLS_DIR (dev only)
#
# --upstream real   provider clusters go to api.openai.com:443 / api.anthropic.com:443
#                   over TLS (SNI + certificate check against $CA_BUNDLE). Needs
#                   OPENAI_API_KEY / ANTHROPIC_API_KEY, or key files already in $SECRETS_DIR.
# --upstream mock   both go to the mock upstream on 127.0.0.1:$MOCK_PORT over plain HTTP
#                   (cargo run -p caracal-tests --bin mock-llm -- --port $MOCK_PORT);
#                   dummy provider keys are written when none are given.
# --validate        also runs `envoy --mode validate` on the result (needs --out).
#
# Settings (environment, with defaults):
#   LISTEN_PORT=8443 ADMIN_PORT=9901 AUTHZ_HOST=127.0.0.1 AUTHZ_PORT=50051
#   AUTHZ_TIMEOUT_MS=200 FAILURE_MODE=deny MOCK_PORT=9000
#   WASM_PATH=<repo>/target/wasm32-wasip1/wasm/caracal_filter.wasm
#   SECRETS_DIR=/tmp/caracal-envoy/secrets   (outside the repository on purpose)
#   TLS_DIR=/tmp/caracal-envoy/tls  CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
#   AUTHZ_SNI=caracal-authz  ENVOY=<repo>/.venv/bin/envoy
#   GATEWAY_TOKEN=$CARACAL_GATEWAY_TOKEN (empty: none) the token the gateway sends as
#                   x-caracal-gateway-token to the authz-service on plain TCP (the
#                   service's auth.gatewayToken); production uses mTLS instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

upstream=real
template="$here/envoy.yaml"
out=""
validate=false
gen_certs=false
while [ $# -gt 0 ]; do
  case "$1" in
    --upstream) upstream="${2:?--upstream needs real|mock}"; shift 2 ;;
    --template) template="${2:?--template needs a file}"; shift 2 ;;
    --out) out="${2:?--out needs a file}"; shift 2 ;;
    --validate) validate=true; shift ;;
    --gen-dev-certs) gen_certs=true; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "render.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

LISTEN_PORT="${LISTEN_PORT:-8443}"
ADMIN_PORT="${ADMIN_PORT:-9901}"
AUTHZ_HOST="${AUTHZ_HOST:-127.0.0.1}"
AUTHZ_PORT="${AUTHZ_PORT:-50051}"
AUTHZ_TIMEOUT_MS="${AUTHZ_TIMEOUT_MS:-200}"
FAILURE_MODE="${FAILURE_MODE:-deny}"
MOCK_PORT="${MOCK_PORT:-9000}"
WASM_PATH="${WASM_PATH:-$repo/target/wasm32-wasip1/wasm/caracal_filter.wasm}"
SECRETS_DIR="${SECRETS_DIR:-/tmp/caracal-envoy/secrets}"
TLS_DIR="${TLS_DIR:-/tmp/caracal-envoy/tls}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
AUTHZ_SNI="${AUTHZ_SNI:-caracal-authz}"
ENVOY="${ENVOY:-$repo/.venv/bin/envoy}"
GATEWAY_TOKEN="${GATEWAY_TOKEN:-${CARACAL_GATEWAY_TOKEN:-}}"

if $gen_certs; then
  # Development certificates only. Two CAs: ca.crt signs the gateway's and the
  # authz-service's server certs and Envoy's client cert for mTLS to authz (the
  # authz-service treats a client cert from its clientCaFile as an administrator, so
  # agents must NOT chain to it); agents-ca.crt signs agent certs (SPIFFE ids), which
  # the gateway listener verifies.
  mkdir -p "$TLS_DIR"; cd "$TLS_DIR"
  for ca in ca agents-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
      -subj "/CN=caracal-dev-$ca" -keyout "$ca.key" -out "$ca.crt" 2>/dev/null
  done
  issue() { # name, subject CN, subjectAltName, extendedKeyUsage, signing CA
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
      -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$3" "$4" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$5.crt" -CAkey "$5.key" -CAcreateserial -days 365 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  }
  issue gateway localhost "DNS:localhost,IP:127.0.0.1" serverAuth ca
  issue envoy-client caracal-gateway "URI:spiffe://caracal.local/ns/caracal/sa/gateway" clientAuth ca
  issue authz "$AUTHZ_SNI" "DNS:$AUTHZ_SNI,DNS:localhost,IP:127.0.0.1" serverAuth ca
  issue agent agent "URI:spiffe://caracal.local/ns/agents/sa/demo-agent" clientAuth agents-ca
  chmod 600 ./*.key
  echo "dev certificates written to $TLS_DIR" >&2
  exit 0
fi

case "$AUTHZ_TIMEOUT_MS" in ''|*[!0-9]*) echo "AUTHZ_TIMEOUT_MS must be a number" >&2; exit 2 ;; esac
AUTHZ_TIMEOUT_S="$(printf '%d.%03d' $((AUTHZ_TIMEOUT_MS / 1000)) $((AUTHZ_TIMEOUT_MS % 1000)))"
# The token lands in a JSON string and a YAML string: visible ASCII, no quotes.
case "$GATEWAY_TOKEN" in *[!A-Za-z0-9._~+/=:@-]*) echo "GATEWAY_TOKEN: use letters, digits and ._~+/=:@- only" >&2; exit 2 ;; esac
case "$FAILURE_MODE" in
  deny) FAILURE_MODE_ALLOW=false ;;
  allow) FAILURE_MODE_ALLOW=true ;;
  *) echo "FAILURE_MODE must be deny or allow" >&2; exit 2 ;;
esac

raw='{name: envoy.transport_sockets.raw_buffer, typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}'
tls_to() { # host
  printf '{name: envoy.transport_sockets.tls, typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: %s, common_tls_context: {validation_context: {trusted_ca: {filename: "%s"}, match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: %s}}]}}}}' "$1" "$CA_BUNDLE" "$1"
}

case "$upstream" in
  real)
    OPENAI_HOST=api.openai.com OPENAI_PORT=443 OPENAI_TS="$(tls_to api.openai.com)"
    ANTHROPIC_HOST=api.anthropic.com ANTHROPIC_PORT=443 ANTHROPIC_TS="$(tls_to api.anthropic.com)" ;;
  mock)
    OPENAI_HOST=127.0.0.1 OPENAI_PORT="$MOCK_PORT" OPENAI_TS="$raw"
    ANTHROPIC_HOST=127.0.0.1 ANTHROPIC_PORT="$MOCK_PORT" ANTHROPIC_TS="$raw" ;;
  *) echo "--upstream must be real or mock" >&2; exit 2 ;;
esac

# Provider keys -> SECRETS_DIR/<name>.key (no trailing newline: it would end up in the
# header), referenced by file-based SDS resources that Envoy watches for rotation.
mkdir -p "$SECRETS_DIR"; chmod 700 "$SECRETS_DIR"
write_secret() { # name, env value, mock default, env name
  local key_file="$SECRETS_DIR/$1.key"
  if [ -n "$2" ]; then
    (umask 077; printf '%s' "$2" > "$key_file")
  elif [ ! -s "$key_file" ]; then
    if [ "$upstream" = mock ]; then
      (umask 077; printf '%s' "$3" > "$key_file")
    else
      echo "render.sh: no $1 (set $4 or write $key_file)" >&2; exit 1
    fi
  fi
  cat > "$SECRETS_DIR/$1.sds.yaml" <<EOF
resources:
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: $1
  generic_secret:
    secret:
      filename: "$key_file"
EOF
}
OPENAI_KEY="${OPENAI_API_KEY:-}"; ANTHROPIC_KEY="${ANTHROPIC_API_KEY:-}"
write_secret openai-key "$OPENAI_KEY" sk-mock-openai-provider-key OPENAI_API_KEY
write_secret anthropic-key "$ANTHROPIC_KEY" sk-ant-mock-provider-key ANTHROPIC_API_KEY

# Replace {{NAME}} placeholders (values may contain / " & : escape for sed).
esc() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
rendered="$(sed \
  -e "s|{{LISTEN_PORT}}|$(esc "$LISTEN_PORT")|g" \
  -e "s|{{ADMIN_PORT}}|$(esc "$ADMIN_PORT")|g" \
  -e "s|{{AUTHZ_HOST}}|$(esc "$AUTHZ_HOST")|g" \
  -e "s|{{AUTHZ_PORT}}|$(esc "$AUTHZ_PORT")|g" \
  -e "s|{{AUTHZ_SNI}}|$(esc "$AUTHZ_SNI")|g" \
  -e "s|{{AUTHZ_TIMEOUT_MS}}|$(esc "$AUTHZ_TIMEOUT_MS")|g" \
  -e "s|{{AUTHZ_TIMEOUT_S}}|$(esc "$AUTHZ_TIMEOUT_S")|g" \
  -e "s|{{FAILURE_MODE}}|$(esc "$FAILURE_MODE")|g" \
  -e "s|{{GATEWAY_TOKEN}}|$(esc "$GATEWAY_TOKEN")|g" \
  -e "s|{{FAILURE_MODE_ALLOW}}|$(esc "$FAILURE_MODE_ALLOW")|g" \
  -e "s|{{WASM_PATH}}|$(esc "$WASM_PATH")|g" \
  -e "s|{{SECRETS_DIR}}|$(esc "$SECRETS_DIR")|g" \
  -e "s|{{TLS_DIR}}|$(esc "$TLS_DIR")|g" \
  -e "s|{{OPENAI_HOST}}|$(esc "$OPENAI_HOST")|g" \
  -e "s|{{OPENAI_PORT}}|$(esc "$OPENAI_PORT")|g" \
  -e "s|{{ANTHROPIC_HOST}}|$(esc "$ANTHROPIC_HOST")|g" \
  -e "s|{{ANTHROPIC_PORT}}|$(esc "$ANTHROPIC_PORT")|g" \
  -e "s|{{OPENAI_TRANSPORT_SOCKET}}|$(esc "$OPENAI_TS")|g" \
  -e "s|{{ANTHROPIC_TRANSPORT_SOCKET}}|$(esc "$ANTHROPIC_TS")|g" \
  "$template")"
if left="$(printf '%s\n' "$rendered" | grep -o '{{[A-Z_]*}}' | sort -u | tr '\n' ' ')" && [ -n "$left" ]; then
  echo "render.sh: unreplaced placeholders: $left" >&2; exit 1
fi

if [ -n "$out" ]; then
  printf '%s\n' "$rendered" > "$out"
  echo "rendered $template -> $out (upstream: $upstream)" >&2
  if $validate; then
    "$ENVOY" --mode validate -c "$out" --disable-hot-restart --log-level warn
  fi
else
  $validate && { echo "--validate needs --out" >&2; exit 2; }
  printf '%s\n' "$rendered"
fi
