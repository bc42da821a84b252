#!/usr/bin/env bash
# Signaling load against a release server in its own process, with the in-memory or the Redis
# registry; prints the load tool's report and the server's CPU time.
# usage: benches/signal_load.sh memory|redis RATE   (after: cargo build --release --bins --benches)
set -euo pipefail
cd "$(dirname "$0")/.."
RPID=""
REDIS_PORT=${REDIS_PORT:-6391}
args=(--listen 127.0.0.1:18091)
if [ "$1" = redis ]; then
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & RPID=$!
  sleep 0.3
  args+=(--redis redis://127.0.0.1:$REDIS_PORT/)
fi
RUST_LOG=warn ./target/release/switchboard "${args[@]}" >/dev/null 2>&1 & SPID=$!
sleep 0.5
t0=$(awk '{print $14+$15}' /proc/$SPID/stat)
"$(ls -t ./target/release/deps/signal_load-* | grep -v "\.d$" | head -n1)" --bench --url 127.0.0.1:18091 --clients 200 --rooms 20 --rate $2 --secs 10 2>&1
t1=$(awk '{print $14+$15}' /proc/$SPID/stat)
echo "  server cpu: $(( t1 - t0 )) ticks of 10 ms over the run (10 s measured + 3 s warm-up/drain)"
kill $SPID
[ -z "$RPID" ] || kill $RPID
wait 2>/dev/null || true
