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

# $work/lines-2000 and $work/lines-20000: 56-byte lines to publish.
make_lines() {
    local line
    line=$(printf 'x%.0s' $(seq 56))
    for n in 2000 20000; do
        yes "$line" | head -n "$n" > "$work/lines-$n" || true
    done
}

# The instruction count valgrind reported in $1.
collected() {
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$1"
}
