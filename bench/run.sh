#!/usr/bin/env bash
# Warden benchmark: the demo chat upstream driven three ways in one run.
#
#   direct  the chat simulator alone (a `warden demo` process used only as the upstream)
#   nginx   nginx as a plain reverse proxy in front of that upstream
#   warden  a `warden serve` gateway (API-key auth + audit log) in front of that upstream
#
# Two scenarios per target, both with oha over HTTP/1.1 keep-alive connections:
#   fixed   RATE req/s for DURATION over CONNECTIONS connections, latency corrected for
#           coordinated omission: p50, p99, achieved rate
#   max     no rate limit, CONNECTIONS connections for DURATION: req/s, p50, p99 and the
#           CPU time per request of the proxy process (for direct: of the upstream process)
#
# Usage: bench/run.sh            (from anywhere; it works in the repository root)
# Environment:
#   DURATION=10s RATE=1000 CONNECTIONS=32 WARMUP=2s
#   ROUNDS=6 ROUND_DURATION=5s   (interleaved nginx/Warden maximum-throughput rounds)
#   WARDEN_BIN=target/release/warden   (if unset, the script runs `cargo build --release`)
#   GATEWAY_PORT=28080 ADMIN_PORT=29090 CHAT_PORT=28081 FRAUD_PORT=28082 NGINX_PORT=28083
#   DEMO_PORT=28084 DEMO_ADMIN_PORT=29091   (the upstream process's own, unused, gateway)
#   NGINX_BIN=/usr/sbin/nginx  KEEP_TMP=1 (keep the temp dir with logs and raw JSON)
#   RESULTS_MD=bench/results/latest.md
#   WARDEN_MODE=demo   (force the fallback: measure the gateway embedded in `warden demo`)
# Everything listens on 127.0.0.1 only; nothing outside the loopback is contacted
# (except crates.io / Debian's mirrors when oha, jq or python3 must be installed).
set -euo pipefail

ORIG_CMD="$0${*:+ $*}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DURATION="${DURATION:-10s}"
RATE="${RATE:-1000}"
CONNECTIONS="${CONNECTIONS:-32}"
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-6}"
ROUND_DURATION="${ROUND_DURATION:-5s}"
GATEWAY_PORT="${GATEWAY_PORT:-28080}"
ADMIN_PORT="${ADMIN_PORT:-29090}"
CHAT_PORT="${CHAT_PORT:-28081}"
FRAUD_PORT="${FRAUD_PORT:-28082}"
NGINX_PORT="${NGINX_PORT:-28083}"
DEMO_PORT="${DEMO_PORT:-28084}"
DEMO_ADMIN_PORT="${DEMO_ADMIN_PORT:-29091}"
ISSUER_PORT="${ISSUER_PORT:-28085}"
NGINX_BIN="${NGINX_BIN:-/usr/sbin/nginx}"
RESULTS_MD="${RESULTS_MD:-bench/results/latest.md}"
API_KEY="wdn_demo_acme_7Hq2mX9vLk4pR8sT"
# SHA-256 of API_KEY, as in examples/demo.yaml.
API_KEY_SHA256="0afa2299e2d8d131115738eb24dc74d065fbaf69c1e96c00a5331e9d4e5d4f63"

# "10" -> "10s"; oha takes 10s, 1m, ...
[[ "$DURATION" =~ ^[0-9]+$ ]] && DURATION="${DURATION}s"
[[ "$WARMUP" =~ ^[0-9]+$ ]] && WARMUP="${WARMUP}s"
[[ "$ROUND_DURATION" =~ ^[0-9]+$ ]] && ROUND_DURATION="${ROUND_DURATION}s"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] || { echo "ROUNDS must be an integer, got '$ROUNDS'" >&2; exit 2; }
[[ "$RATE" =~ ^[0-9]+$ ]] || { echo "RATE must be an integer (req/s), got '$RATE'" >&2; exit 2; }
[[ "$CONNECTIONS" =~ ^[0-9]+$ ]] || { echo "CONNECTIONS must be an integer, got '$CONNECTIONS'" >&2; exit 2; }

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- temp dir and cleanup
TMP="$(mktemp -d /tmp/warden-bench.XXXXXX)"
# nginx workers run as `nobody`: they must be able to reach their temp paths.
chmod 755 "$TMP"
mkdir -p "$TMP/results" "$TMP/logs" "$TMP/nginx" "$TMP/audit" "$TMP/demo-audit"
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    # Stop in reverse start order: proxies first, upstream last.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        log "FAILED (exit $rc). Last lines of the logs in $TMP/logs:"
        for f in "$TMP"/logs/*; do
            [[ -s "$f" ]] || continue
            echo "---- $f" >&2
            tail -n 15 "$f" >&2
        done
        log "temp dir kept for inspection: $TMP"
    elif [[ "${KEEP_TMP:-0}" == 1 ]]; then
        log "temp dir kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- tools
ensure_apt() { # ensure_apt COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "$1 not found: installing Debian package $2"
    apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
}
ensure_apt python3 python3
ensure_apt curl curl
[[ -x "$NGINX_BIN" ]] || { ensure_apt nginx nginx-light; NGINX_BIN="$(command -v nginx)"; }

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
    log "oha not found: installing it from crates.io (cargo install oha --locked; takes some minutes)"
    cargo install oha --locked >&2
fi
OHA="$(command -v oha)"
# oha >= 1.5 says --output-format json; older releases say -j.
if "$OHA" --help | grep -q -- '--output-format'; then
    OHA_JSON=(--output-format json)
else
    OHA_JSON=(-j)
fi
OHA_COMMON=(--no-tui "${OHA_JSON[@]}")
# Wait for the requests still in flight at the deadline instead of cancelling them.
if "$OHA" --help | grep -q -- '--wait-ongoing-requests-after-deadline'; then
    OHA_COMMON+=(-w)
fi
LATENCY_CORRECTION=()
if "$OHA" --help | grep -q -- '--latency-correction'; then
    LATENCY_CORRECTION=(--latency-correction)
else
    log "WARNING: this oha has no --latency-correction; fixed-rate latencies are not corrected for coordinated omission"
fi

# ---------------------------------------------------------------- warden binary
WARDEN_BIN_SET="${WARDEN_BIN:-}"
if [[ -z "${WARDEN_BIN:-}" ]]; then
    log "cargo build --release"
    cargo build --release --bin warden >&2
    WARDEN_BIN="$REPO/target/release/warden"
fi
[[ -x "$WARDEN_BIN" ]] || die "no warden binary at $WARDEN_BIN"
WARDEN_BIN="$(cd "$(dirname "$WARDEN_BIN")" && pwd)/$(basename "$WARDEN_BIN")"

# ---------------------------------------------------------------- helpers
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for p in "$ISSUER_PORT" "$GATEWAY_PORT" "$ADMIN_PORT" "$CHAT_PORT" "$FRAUD_PORT" "$NGINX_PORT" "$DEMO_PORT" "$DEMO_ADMIN_PORT"; do
    port_busy "$p" && die "port 127.0.0.1:$p is already in use (override the *_PORT variables)"
done

# wait_port PID PORT NAME: until something answers HTTP on the port (bounded: 15 s).
wait_port() {
    local pid=$1 port=$2 name=$3 code
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 1
        code="$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$port/" || true)"
        [[ "$code" != "000" && -n "$code" ]] && return 0
        sleep 0.1
    done
    log "$name did not answer on 127.0.0.1:$port within 15 s"
    return 1
}

# cpu_ticks PID...: utime+stime (all threads) summed over the given processes.
cpu_ticks() {
    local total=0 pid fields
    for pid in "$@"; do
        # Fields after "pid (comm) ": utime and stime are the 12th and 13th.
        fields="$(sed 's/^.*) //' "/proc/$pid/stat")" || die "process $pid is gone"
        read -r -a f <<<"$fields"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
CLK_TCK="$(getconf CLK_TCK)"

BODY="$TMP/body.json"
printf '%s' '{"model":"demo-chat","messages":[{"role":"user","content":"Hello Warden, how are you today?"}]}' >"$BODY"

# check_once NAME URL: one request with curl; must be 200 with a chat completion.
check_once() {
    local name=$1 url=$2 code
    code="$(curl -s -o "$TMP/logs/$name.check.json" -w '%{http_code}' -m 5 -X POST "$url" \
        -H 'Content-Type: application/json' -H "Authorization: Bearer $API_KEY" --data-binary "@$BODY" || true)"
    [[ "$code" == 200 ]] || die "$name: a single request got HTTP $code, not 200: $(head -c 300 "$TMP/logs/$name.check.json" 2>/dev/null)"
    grep -q '"choices"' "$TMP/logs/$name.check.json" || die "$name: the response is not a chat completion: $(head -c 300 "$TMP/logs/$name.check.json")"
}

# oha_run OUTFILE URL EXTRA_ARGS...: one oha run, JSON to OUTFILE, fails on any non-2xx.
oha_run() {
    local out=$1 url=$2
    shift 2
    "$OHA" "${OHA_COMMON[@]}" -m POST -T application/json -H "Authorization: Bearer $API_KEY" \
        -D "$BODY" "$@" "$url" >"$out" 2>"$out.stderr" ||
        die "oha failed for $url: $(tail -n 5 "$out.stderr")"
    python3 - "$out" <<'PY' || die "bad responses in $out"
import json, sys
path = sys.argv[1]
with open(path) as f:
    r = json.load(f)
codes = {str(k): v for k, v in (r.get("statusCodeDistribution") or {}).items()}
errors = r.get("errorDistribution") or {}
ok = sum(v for k, v in codes.items() if k.startswith("2"))
bad = {k: v for k, v in codes.items() if not k.startswith("2")}
if ok == 0:
    sys.exit(f"{path}: no 2xx response at all (status codes {codes}, errors {errors})")
if bad:
    sys.exit(f"{path}: non-2xx responses: {bad} (2xx: {ok})")
# Requests cancelled at the deadline are not failures; anything else is.
real_errors = {k: v for k, v in errors.items() if "deadline" not in k.lower()}
if real_errors:
    sys.exit(f"{path}: request errors: {real_errors}")
PY
}

# ---------------------------------------------------------------- processes
# 1. The upstream: a `warden demo` process; only its chat simulator port is used.
log "starting the upstream: warden demo (chat simulator on 127.0.0.1:$CHAT_PORT)"
"$WARDEN_BIN" demo --listen "127.0.0.1:$DEMO_PORT" --admin "127.0.0.1:$DEMO_ADMIN_PORT" \
    --chat-upstream "127.0.0.1:$CHAT_PORT" --fraud-upstream "127.0.0.1:$FRAUD_PORT" --issuer "127.0.0.1:$ISSUER_PORT" \
    --audit-dir "$TMP/demo-audit" >"$TMP/logs/upstream-demo.log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_port "$UPSTREAM_PID" "$CHAT_PORT" "chat simulator" || die "the upstream (warden demo) did not start"

# 2. nginx as a plain reverse proxy, foreground child, everything in the temp dir.
NGINX_CONF="$TMP/nginx/nginx.conf"
cat >"$NGINX_CONF" <<EOF
# Written by bench/run.sh: a plain reverse proxy, the reference cost of proxying.
worker_processes auto;
pid $TMP/nginx/nginx.pid;
error_log $TMP/logs/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # Neither side closes a kept-alive connection after N requests (Warden does not either).
    keepalive_requests 1000000;
    upstream chat {
        server 127.0.0.1:$CHAT_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://chat;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
log "starting nginx on 127.0.0.1:$NGINX_PORT ($NGINX_BIN)"
"$NGINX_BIN" -t -q -p "$TMP/nginx" -e "$TMP/logs/nginx-error.log" -c "$NGINX_CONF" 2>>"$TMP/logs/nginx-error.log" ||
    die "nginx rejected $NGINX_CONF"
"$NGINX_BIN" -p "$TMP/nginx" -e "$TMP/logs/nginx-error.log" -c "$NGINX_CONF" -g 'daemon off;' \
    >"$TMP/logs/nginx-stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PID" "$NGINX_PORT" "nginx" || die "nginx did not start"

# 3. The Warden gateway: `warden serve` on a config pointing at the upstream above.
WARDEN_CONF="$TMP/warden.yaml"
AUDIT_FILE="$TMP/audit/warden-bench-audit.jsonl"
cat >"$WARDEN_CONF" <<EOF
# Written by bench/run.sh; the structure of examples/demo.yaml.
listen:
  address: 127.0.0.1:$GATEWAY_PORT
  max_body_bytes: 1MiB
  shutdown_grace: 1s
admin:
  address: 127.0.0.1:$ADMIN_PORT
audit:
  file: $AUDIT_FILE
upstreams:
  - name: chat-simulator
    url: http://127.0.0.1:$CHAT_PORT
  - name: fraud-model
    url: http://127.0.0.1:$FRAUD_PORT
    first_byte_timeout: 5s
models:
  - name: demo-chat
    protocol: openai
    upstream: chat-simulator
  - name: fraud-scorer
    protocol: oip_v2
    upstream: fraud-model
    max_body_bytes: 256KiB
api_keys:
  - id: demo-acme
    sha256: $API_KEY_SHA256
    principal: alice@acme.example
    tenant: acme
    tier: pro
    models: [demo-chat, fraud-scorer]
EOF

MODE=separate
WARDEN_URL="http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions"
log "starting the gateway: warden serve on 127.0.0.1:$GATEWAY_PORT"
serve_ok=0
if [[ "${WARDEN_MODE:-serve}" == demo ]]; then
    log "WARDEN_MODE=demo: not starting warden serve"
elif "$WARDEN_BIN" check --config "$WARDEN_CONF" >"$TMP/logs/warden-check.log" 2>&1; then
    "$WARDEN_BIN" serve --config "$WARDEN_CONF" >"$TMP/logs/warden-serve.log" 2>&1 &
    GATEWAY_PID=$!
    PIDS+=("$GATEWAY_PID")
    if wait_port "$GATEWAY_PID" "$GATEWAY_PORT" "warden serve"; then
        if code="$(curl -s -o "$TMP/logs/warden-serve.check.json" -w '%{http_code}' -m 5 -X POST "$WARDEN_URL" \
            -H 'Content-Type: application/json' -H "Authorization: Bearer $API_KEY" --data-binary "@$BODY")" &&
            [[ "$code" == 200 ]]; then
            serve_ok=1
        else
            log "warden serve answered HTTP ${code:-000}: $(head -c 300 "$TMP/logs/warden-serve.check.json" 2>/dev/null)"
        fi
    fi
else
    log "warden check rejected the benchmark config: $(cat "$TMP/logs/warden-check.log")"
fi
if [[ $serve_ok != 1 ]]; then
    log "WARNING: 'warden serve --config' is not usable; FALLING BACK to the gateway embedded in the"
    log "         'warden demo' process: its CPU figure then includes the upstream's own CPU."
    log "         warden serve log: $(tail -n 5 "$TMP/logs/warden-serve.log" 2>/dev/null | tr '\n' ' ')"
    MODE=fallback
    GATEWAY_PID="$UPSTREAM_PID"
    WARDEN_URL="http://127.0.0.1:$DEMO_PORT/v1/chat/completions"
    AUDIT_FILE="$(ls "$TMP"/demo-audit/* 2>/dev/null | head -n 1 || true)"
fi

DIRECT_URL="http://127.0.0.1:$CHAT_PORT/v1/chat/completions"
NGINX_URL="http://127.0.0.1:$NGINX_PORT/v1/chat/completions"
check_once direct "$DIRECT_URL"
check_once nginx "$NGINX_URL"
check_once warden "$WARDEN_URL"

nginx_pids() { echo "$NGINX_PID" $(ps -o pid= --ppid "$NGINX_PID"); }

# ---------------------------------------------------------------- load
# bench TARGET URL PROXY_PIDS...
bench() {
    local target=$1 url=$2
    shift 2
    local pids=("$@") before after ubefore uafter
    log "$target: warm-up ${WARMUP} over $CONNECTIONS connections"
    oha_run "$TMP/results/$target-warmup.json" "$url" -z "$WARMUP" -c "$CONNECTIONS"
    log "$target: fixed rate $RATE req/s for $DURATION over $CONNECTIONS connections"
    oha_run "$TMP/results/$target-fixed.json" "$url" -z "$DURATION" -c "$CONNECTIONS" -q "$RATE" "${LATENCY_CORRECTION[@]}"
    log "$target: maximum throughput for $DURATION over $CONNECTIONS connections"
    before="$(cpu_ticks "${pids[@]}")"
    ubefore="$(cpu_ticks "$UPSTREAM_PID")"
    oha_run "$TMP/results/$target-max.json" "$url" -z "$DURATION" -c "$CONNECTIONS"
    after="$(cpu_ticks "${pids[@]}")"
    uafter="$(cpu_ticks "$UPSTREAM_PID")"
    printf '{"proxy_ticks": %d, "upstream_ticks": %d, "clk_tck": %d, "pids": "%s"}\n' \
        "$((after - before))" "$((uafter - ubefore))" "$CLK_TCK" "${pids[*]}" >"$TMP/results/$target-cpu.json"
}

bench direct "$DIRECT_URL" "$UPSTREAM_PID"
# shellcheck disable=SC2046
bench nginx "$NGINX_URL" $(nginx_pids)
bench warden "$WARDEN_URL" "$GATEWAY_PID"

# Interleaved rounds: nginx and Warden at maximum throughput, one after the
# other, ROUNDS times (the order swapped every round). This machine's speed
# drifts by tens of percent within minutes, which one nginx run followed by
# one Warden run cannot tell from a difference between them; the median of
# the per-round ratios can.
for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then order=(nginx warden); else order=(warden nginx); fi
    for target in "${order[@]}"; do
        url="$NGINX_URL"
        [[ $target == warden ]] && url="$WARDEN_URL"
        log "round $round/$ROUNDS: $target at maximum throughput for $ROUND_DURATION"
        oha_run "$TMP/results/round-$round-$target.json" "$url" -z "$ROUND_DURATION" -c "$CONNECTIONS"
    done
done

# Give the audit writer a moment to drain, then count its records.
sleep 1
AUDIT_LINES=0
AUDIT_200=0
if [[ -n "$AUDIT_FILE" && -f "$AUDIT_FILE" ]]; then
    AUDIT_LINES="$(wc -l <"$AUDIT_FILE")"
    AUDIT_200="$(grep -c '"status":200,' "$AUDIT_FILE" || true)"
fi
# Successful requests sent to the measured gateway by curl, outside oha.
CURL_CHECKS=1
[[ $MODE == separate ]] && CURL_CHECKS=2

# ---------------------------------------------------------------- summary
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | sed 's/^[^:]*: *//' || echo unknown)"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo 'none (no commit yet)')"
if [[ "$COMMIT" != none* ]] && ! git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
    COMMIT="$COMMIT (+ uncommitted changes)"
fi

export B_CMD="DURATION=$DURATION RATE=$RATE CONNECTIONS=$CONNECTIONS WARMUP=$WARMUP ROUNDS=$ROUNDS ROUND_DURATION=$ROUND_DURATION ${WARDEN_BIN_SET:+WARDEN_BIN=$WARDEN_BIN }$ORIG_CMD"
export B_DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
export B_NPROC="$(nproc)"
export B_CPU="$CPU_MODEL"
export B_LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
export B_COMMIT="$COMMIT"
export B_MODE="$MODE"
export B_RATE="$RATE" B_DURATION="$DURATION" B_CONNECTIONS="$CONNECTIONS" B_WARMUP="$WARMUP"
export B_ROUNDS="$ROUNDS" B_ROUND_DURATION="$ROUND_DURATION"
export B_OHA="$("$OHA" --version 2>/dev/null | head -n1)"
export B_NGINX="$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')"  # e.g. nginx/1.22.1
export B_WARDEN="$("$WARDEN_BIN" --version 2>/dev/null | head -n1 || echo warden)"
export B_AUDIT_LINES="$AUDIT_LINES" B_AUDIT_200="$AUDIT_200" B_CURL_CHECKS="$CURL_CHECKS"
export B_OHA_FIXED="oha ${OHA_COMMON[*]} -m POST -T application/json -H 'Authorization: Bearer <demo key>' -D body.json -z $DURATION -c $CONNECTIONS -q $RATE ${LATENCY_CORRECTION[*]} URL"
export B_OHA_MAX="oha ${OHA_COMMON[*]} -m POST -T application/json -H 'Authorization: Bearer <demo key>' -D body.json -z $DURATION -c $CONNECTIONS URL"
mkdir -p "$(dirname "$RESULTS_MD")"
python3 "$REPO/bench/summarize.py" "$TMP/results" "$RESULTS_MD"
log "markdown summary written to $RESULTS_MD"
