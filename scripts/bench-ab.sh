#!/usr/bin/env bash
# A paired comparison of two `vmm stress` configurations on a noisy, shared host: runs A and B
# alternately (A B A B ...), each sample `--duration AB_DURATION` seconds of fresh-VM runs,
# and prints every sample, the medians and the ratio of medians A / B. Alternating puts both
# configurations under the same drift of the host's load.
#
#   scripts/bench-ab.sh "--fault-around adaptive" "--fault-around 512"
#   scripts/bench-ab.sh "--fault-mode handler --fault-around 1" \
#                       "VMM_UFFD_ALWAYS_WAKE=1 --fault-mode handler --fault-around 1"
#
# Leading NAME=VALUE words of a configuration are set in the environment of its runs.
# Knobs (environment): AB_ROUNDS (5), AB_DURATION (3), AB_PAGES (32768), AB_VCPUS (2), VMM (the binary;
# default: built with cargo, release).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -ne 2 ]]; then
    echo "usage: $0 'FLAGS A' 'FLAGS B'" >&2
    exit 2
fi
ROUNDS=${AB_ROUNDS:-5}
DURATION=${AB_DURATION:-3}
PAGES=${AB_PAGES:-32768}
VCPUS=${AB_VCPUS:-2}
if [[ -z "${VMM:-}" ]]; then
    cargo build --release -p vmm --quiet
    VMM="${CARGO_TARGET_DIR:-target}/release/vmm"
fi

sample() {
    local envs=() flags=()
    for w in $1; do
        if [[ ${#flags[@]} -eq 0 && "$w" == *=* ]]; then envs+=("$w"); else flags+=("$w"); fi
    done
    env "${envs[@]}" "$VMM" stress --json --vcpus "$VCPUS" --pages "$PAGES" --duration "$DURATION" \
        "${flags[@]}" | python3 -c 'import json, sys; v = json.load(sys.stdin); assert v["verify_errors"] == 0, v; print(v["faults_per_sec"])'
}

a=() b=()
for r in $(seq 1 "$ROUNDS"); do
    a+=("$(sample "$1")")
    b+=("$(sample "$2")")
    printf 'round %d: A %.0f  B %.0f\n' "$r" "${a[-1]}" "${b[-1]}"
done
python3 - "$1" "$2" "${a[*]}" "${b[*]}" <<'EOF'
import statistics, sys
fa, fb, a, b = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"A ({fa}): median {ma:.0f} first touches/s")
print(f"B ({fb}): median {mb:.0f} first touches/s")
print(f"A / B = {ma / mb:.2f}")
EOF
