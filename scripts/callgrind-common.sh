# Sourced by scripts/callgrind-*: a work directory removed at exit, Mosquitto
# brokers of their own on free loopback ports (stopped by PID at exit), and
# the lines to publish. Not run by itself.

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# A TCP port free on 127.0.0.1 now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until something listens on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

# Starts a Mosquitto on 127.0.0.1:$1 that queues without limit for
# persistent sessions, and waits until it listens.
broker() {
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n' "$1" \
        > "$work/m-$1.conf"
    mosquitto -c "$work/m-$1.conf" > "$work/mosquitto-$1.log" 2>&1 &
    pids+=($!)
    wait_port "$1"
}

# $work/lines-N for each N given (default 2000 and 20000): 56-byte lines
# to publish.
make_lines() {
    local line n counts=("$@")
    [ ${#counts[@]} -gt 0 ] || counts=(2000 20000)
    line=$(printf 'x%.0s' $(seq 56))
    for n in "${counts[@]}"; do
        yes "$line" | head -n "$n" > "$work/lines-$n" || true
    done
}

# The messages the brokers acknowledged to the process whose metrics listen
# on 127.0.0.1:$1 (`steadfast_broker_acked_total`; 0 while it does not answer).
acked() {
    python3 - "$1" <<'PY'
import sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
except Exception:
    print(0); sys.exit()
print(int(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("steadfast_broker_acked_total"))))
PY
}

# For `steadfast bridge` ($1): $work/bridge.toml, one route named $2 from
# the broker on port $3 (topics $2/$5/#, QoS 1) to the one on port $4, its
# store in a fresh $work/store; the route's session made (`--register`) and
# $5 lines of $work/lines-$5 queued for it at the source by `steadfast pub`
# (QoS 1, MQTT 5).
bridge_backlog() {
    local bin=$1 name=$2 local_port=$3 up_port=$4 n=$5
    rm -rf "$work/store" "$work/pub"
    cat > "$work/bridge.toml" <<TOML
[store]
dir = "$work/store"
[[route]]
name = "$name"
[route.source]
brokers = ["mqtt://127.0.0.1:$local_port"]
topics = ["$name/$n/#"]
qos = 1
client_id = "$name-bridge-$n-$RANDOM"
[route.destination]
brokers = ["mqtt://127.0.0.1:$up_port"]
TOML
    # Bounded: a broker that stopped answering fails the script, never hangs it.
    timeout 120 "$bin" bridge --config "$work/bridge.toml" --register > "$work/register.log" 2>&1 ||
        { echo "bridge --register failed or took over 120 s:" >&2; cat "$work/register.log" >&2; return 1; }
    timeout 600 "$bin" pub -h 127.0.0.1 -p "$local_port" -V 5 -t "$name/$n/t" -q 1 -l --outbox "$work/pub" \
        --progress never < "$work/lines-$n" > /dev/null ||
        { echo "pub of the backlog failed or took over 600 s" >&2; return 1; }
}

# The instruction count valgrind reported in $1.
collected() {
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$1"
}
