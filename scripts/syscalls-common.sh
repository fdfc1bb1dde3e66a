# Sourced by scripts/syscalls-*: the kernel tracepoints counted by
# `perf stat`, and the per-message report of two measurements. Sources
# scripts/callgrind-common.sh (work directory, brokers, ports). Not run by
# itself.
command -v perf > /dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
source "$(dirname "$0")/callgrind-common.sh"
calls=(futex epoll_wait sendto recvfrom write writev read pwrite64 pread64 fsync fdatasync fcntl setsockopt)
events=(-e task-clock -e context-switches -e raw_syscalls:sys_enter)
for c in "${calls[@]}"; do events+=(-e "syscalls:sys_enter_$c"); done

# Runs "$@" under perf stat and /usr/bin/time, stdin and stdout as given,
# stderr to $work/err.log (perf output to $work/perf.csv).
counted() {
    perf stat -x, -o "$work/perf.csv" "${events[@]}" -- \
        /usr/bin/time -f "%U %S" -o "$work/time.txt" "$@" 2> "$work/err.log"
}

# Prints what the last `counted` run measured, as "name value" lines: user
# and sys (ms), then every counter.
counts() {
    awk '{ printf "user %.0f\nsys %.0f\n", $1 * 1000, $2 * 1000 }' "$work/time.txt"
    awk -F, '$1 ~ /^[0-9.]+$/ { sub(/^syscalls:sys_enter_/, "", $3); sub(/^raw_syscalls:sys_enter$/, "syscalls", $3); print $3, $1 }' \
        "$work/perf.csv"
}

# Prints the per-message difference of two measurements ($2 and $3, from
# `counts`), taken with $4 more messages in the second.
report() {
    local name=$1 small=$2 large=$3 more=$4
    python3 - "$name" "$small" "$large" "$more" <<'PY'
import sys
name, small, large, more = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def parse(text):
    out = {}
    for line in text.splitlines():
        k, v = line.split()
        out[k] = float(v)
    return out
a, b = parse(small), parse(large)
per = {k: (b[k] - a.get(k, 0)) / more for k in b}
head = f"user {per['user'] * 1000:.1f} us, sys {per['sys'] * 1000:.1f} us, " \
       f"context switches {per['context-switches']:.3f}, system calls {per['syscalls']:.3f}"
calls = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                  if k not in ("user", "sys", "task-clock", "context-switches", "syscalls") and v >= 0.001)
print(f"{name}: per message: {head}\n    {calls}")
PY
}
