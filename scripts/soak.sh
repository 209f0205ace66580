#!/usr/bin/env bash
# A bounded soak of the release proxy against the stratum-lab mock pool: overlapping rounds of
# simulated miners connect, submit and leave, and half-way through the pool is killed and started
# again on the same port. Every 10 s the proxy's VmRSS, open fds and threads go into a CSV, and a
# settle phase with no miners at the end shows whether they come back down. Not part of CI.
#
# Usage: scripts/soak.sh [MINUTES (default 5)] [OUTPUT_DIR (default: a new mktemp dir)]
# Knobs (environment): MINERS=150 per round, RATE=2 shares/s per miner, ROUND_S=25 seconds of
#   submitting per round, ROUND_GAP_S=15 between round starts (so rounds overlap), POOL_DOWN_S=10,
#   SETTLE_S=30, RETRY_MAX_MS=5000 (the proxy's upstream backoff cap), POOL_PORT=24331,
#   PROXY_PORT=24332, HTTP_PORT=24339.
#
# Everything runs on 127.0.0.1. Every process the script starts is stopped by PID on exit, each
# miner round runs under `timeout`, the pool exits by itself (--exit-after), and a watchdog kills
# the proxy if the script itself is killed without running its trap.
set -euo pipefail

MINUTES=${1:-5}
OUT=${2:-}
MINERS=${MINERS:-150}
RATE=${RATE:-2}
ROUND_S=${ROUND_S:-25}
ROUND_GAP_S=${ROUND_GAP_S:-15}
POOL_DOWN_S=${POOL_DOWN_S:-10}
SETTLE_S=${SETTLE_S:-30}
RETRY_MAX_MS=${RETRY_MAX_MS:-5000}
POOL_PORT=${POOL_PORT:-24331}
PROXY_PORT=${PROXY_PORT:-24332}
HTTP_PORT=${HTTP_PORT:-24339}
SAMPLE_S=10

die() {
    echo "soak: $*" >&2
    exit 1
}

[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || die "MINUTES must be a positive whole number, got '$MINUTES'"
((MINUTES <= 24 * 60)) || die "MINUTES is capped at one day"
for port in "$POOL_PORT" "$PROXY_PORT" "$HTTP_PORT"; do
    [[ $port =~ ^[0-9]+$ ]] && ((port >= 1024 && port < 32768)) || die "ports must be in 1024..32767, got '$port'"
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LAB_DIR=$(cd "$ROOT/../shared/stratum-lab" && pwd)
LAB_TARGET=${LAB_TARGET:-/tmp/stratum-lab-target}
LAB=$LAB_TARGET/release/stratum-lab
PROXY=$ROOT/target/release/loka-stratum

if [[ ! -x $LAB ]]; then
    echo "soak: building stratum-lab into $LAB_TARGET" >&2
    (cd "$LAB_DIR" && CARGO_TARGET_DIR=$LAB_TARGET timeout 900 cargo build --release) >&2
fi
if [[ ! -x $PROXY ]]; then
    echo "soak: building the proxy" >&2
    (cd "$ROOT" && timeout 900 cargo build --release) >&2
fi

if [[ -z $OUT ]]; then
    OUT=$(mktemp -d /tmp/loka-soak.XXXXXX)
else
    mkdir -p "$OUT"
fi
CSV=$OUT/samples.csv

RUN_S=$((MINUTES * 60))
POOL_KILL_AT=$((RUN_S / 2))
POOL_BACK_AT=$((POOL_KILL_AT + POOL_DOWN_S))
# The pool's own safety net, and the watchdog's, well past the planned end.
HARD_LIMIT_S=$((RUN_S + SETTLE_S + 120))

POOL_PID=
PROXY_PID=
WATCHDOG_PID=
ROUND_PIDS=()

# Sends TERM to each PID, waits up to 15 s for them (the proxy drains for up to its 10 s grace),
# then KILLs what is left.
stop_pids() {
    local pid alive
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 150); do
        alive=0
        for pid in "$@"; do
            if kill -0 "$pid" 2>/dev/null; then
                alive=1
            fi
        done
        if ((!alive)); then
            break
        fi
        sleep 0.1
    done
    for pid in "$@"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

cleanup() {
    # Unquoted on purpose: a PID that is not set expands to nothing.
    local pids=("${ROUND_PIDS[@]}" $WATCHDOG_PID $PROXY_PID $POOL_PID)
    if ((${#pids[@]})); then
        stop_pids "${pids[@]}"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Polls (bounded) until something accepts connections on 127.0.0.1:$1.
wait_port() {
    local port=$1
    for _ in $(seq 100); do
        if timeout 1 bash -c ": </dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

start_pool() {
    local n=$1
    "$LAB" pool --listen "127.0.0.1:$POOL_PORT" --difficulty 0.000000000001 --notify-ms 10000 \
        --stats-file "$OUT/pool-$n.stats.json" --exit-after "$HARD_LIMIT_S" \
        >"$OUT/pool-$n.json" 2>"$OUT/pool-$n.log" &
    POOL_PID=$!
    wait_port "$POOL_PORT" || die "the pool did not start on port $POOL_PORT (see $OUT/pool-$n.log)"
}

stop_pool() {
    stop_pids "$POOL_PID"
    POOL_PID=
}

ROUNDS=0
start_round() {
    ROUNDS=$((ROUNDS + 1))
    timeout $((ROUND_S + 60)) "$LAB" miners --connect "127.0.0.1:$PROXY_PORT" --count "$MINERS" --rate "$RATE" \
        --duration "$ROUND_S" --ramp-ms 10 --user-prefix "r$ROUNDS" \
        >"$OUT/round-$ROUNDS.json" 2>"$OUT/round-$ROUNDS.log" &
    ROUND_PIDS+=("$!")
}

# Forgets rounds that have ended, so that the trap stops only live ones.
reap_rounds() {
    local live=() pid
    for pid in "${ROUND_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            live+=("$pid")
        else
            wait "$pid" 2>/dev/null || true
        fi
    done
    ROUND_PIDS=("${live[@]}")
}

status_field() {
    awk -v key="$1:" '$1 == key { print $2; exit }' "/proc/$PROXY_PID/status"
}

sample() {
    local t=$1 phase=$2 rss fds threads
    [[ -d /proc/$PROXY_PID ]] || die "the proxy (PID $PROXY_PID) died at t=${t}s in phase $phase; see $OUT/proxy.log"
    rss=$(status_field VmRSS)
    threads=$(status_field Threads)
    fds=$(ls "/proc/$PROXY_PID/fd" | wc -l)
    echo "$t,$rss,$fds,$threads,$phase" >>"$CSV"
    echo "soak: t=${t}s rss=${rss}kB fds=$fds threads=$threads phase=$phase" >&2
}

echo "soak: output in $OUT; $MINUTES min of churn ($MINERS miners x $RATE/s per round), pool restart at ${POOL_KILL_AT}s" >&2
echo "time_s,rss_kb,fds,threads,phase" >"$CSV"

start_pool 1
LOKA_UPSTREAM__RETRY_MAX_MS=$RETRY_MAX_MS "$PROXY" --listen "127.0.0.1:$PROXY_PORT" \
    --pool "stratum+tcp://127.0.0.1:$POOL_PORT" --http-listen "127.0.0.1:$HTTP_PORT" --pool-user soak \
    >"$OUT/proxy.log" 2>&1 &
PROXY_PID=$!
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$HARD_LIMIT_S" &
    sleeper=$!
    wait "$sleeper"
    kill -KILL "$PROXY_PID" 2>/dev/null
) &
WATCHDOG_PID=$!
wait_port "$HTTP_PORT" || die "the proxy did not start (see $OUT/proxy.log)"

START=$SECONDS
next_sample=0
next_round=$SAMPLE_S
pool_restarts=0
phase=start
while :; do
    t=$((SECONDS - START))
    ((t < RUN_S + SETTLE_S)) || break
    if ((pool_restarts == 0 && t >= POOL_KILL_AT)) && [[ $phase != pool_down ]]; then
        echo "soak: killing the pool at t=${t}s" >&2
        stop_pool
        phase=pool_down
    fi
    if [[ $phase == pool_down ]] && ((t >= POOL_BACK_AT)); then
        echo "soak: restarting the pool at t=${t}s" >&2
        start_pool 2
        pool_restarts=1
        phase=churn_after_restart
    fi
    if ((t >= next_round && t + ROUND_S + 5 <= RUN_S)); then
        start_round
        next_round=$((t + ROUND_GAP_S))
        if [[ $phase == start ]]; then
            phase=churn
        fi
    fi
    if ((t >= RUN_S)) && [[ $phase != settle ]]; then
        phase=settle
    fi
    if ((t >= next_sample)); then
        sample "$t" "$phase"
        next_sample=$((next_sample + SAMPLE_S))
    fi
    reap_rounds
    sleep 1
done
((pool_restarts == 1)) || die "the pool restart did not happen (is MINUTES too short?)"

# Rounds still running at the end of the settle phase would mean a miner hung; stop them.
reap_rounds
if ((${#ROUND_PIDS[@]})); then
    echo "soak: ${#ROUND_PIDS[@]} miner rounds still running after the settle phase; stopping them" >&2
    stop_pids "${ROUND_PIDS[@]}"
    ROUND_PIDS=()
fi

{
    echo "column,min,max,last"
    awk -F, 'NR > 1 {
        for (i = 2; i <= 4; i++) {
            if (!(i in min) || $i < min[i]) min[i] = $i
            if (!(i in max) || $i > max[i]) max[i] = $i
            last[i] = $i
        }
    }
    END {
        split("time_s,rss_kb,fds,threads", name, ",")
        for (i = 2; i <= 4; i++) printf "%s,%s,%s,%s\n", name[i], min[i], max[i], last[i]
    }' "$CSV"
} >"$OUT/summary.csv"

echo "soak: samples in $CSV" >&2
cat "$OUT/summary.csv"
echo "rounds: $ROUNDS (round-N.json), per round: connected submitted accepted rejected timeouts disconnects"
for n in $(seq "$ROUNDS"); do
    jq -c '[.connected, .submitted, .accepted, .rejected, .timeouts, .disconnects]' "$OUT/round-$n.json" 2>/dev/null ||
        echo "round $n: no summary (see $OUT/round-$n.log)"
done
