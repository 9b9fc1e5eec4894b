#!/usr/bin/env bash
# The `vmm stress` comparison matrix: fault modes x address spaces x vCPUs x churn rates, each
# configuration repeated, best and median kept. Writes under docs/ (or $BENCH_OUT):
#
#   bench-results.jsonl       every run's JSON object (one per line)
#   bench-table.md            the Markdown table, target ratios, command and machine
#   bench-faults.svg          faults/s per configuration (bar: median, tick: best)
#   bench-latency-MODE.svg    first-touch latency distributions (2 vCPUs, bonsai, no churn)
#   bench-throughput-churn.svg  first touches/s over time under churn 10000 (vcpu, bonsai)
#
# Knobs (environment):
#   BENCH_PAGES    pages per vCPU                  (default 32768)
#   BENCH_REPEATS  runs of each configuration      (default 3)
#   BENCH_MODES    among vcpu vcpu-fa16 vcpu-adaptive handler kernel
#                  (default: vcpu vcpu-fa16 handler kernel)
#   BENCH_SPACES   among bonsai rwlock cow          (default: all three)
#   BENCH_VCPUS    vCPU counts                      (default "1 2")
#   BENCH_CHURN    churn rates in ops/s             (default "0 1000 10000")
#   BENCH_REGIONS  extra regions (--regions)        (default 1000)
#   BENCH_MEMSLOTS window or per-region (--memslots) (default window; scripts/bench-memslots.sh
#                  compares the two)
#   BENCH_OUT      output directory                 (default docs)
#   VMM            the vmm binary (default: built with cargo, release)
#
# Repeats are the outer loop, so that slow drift of the host (other tenants, thermal) spreads
# over every configuration instead of landing on one.
set -euo pipefail
cd "$(dirname "$0")/.."

PAGES=${BENCH_PAGES:-32768}
REPEATS=${BENCH_REPEATS:-3}
MODES=${BENCH_MODES:-"vcpu vcpu-fa16 handler kernel"}
SPACES=${BENCH_SPACES:-"bonsai rwlock cow"}
VCPUS=${BENCH_VCPUS:-"1 2"}
CHURN=${BENCH_CHURN:-"0 1000 10000"}
REGIONS=${BENCH_REGIONS:-1000}
MEMSLOTS=${BENCH_MEMSLOTS:-window}
OUT=${BENCH_OUT:-docs}

if [[ -z "${VMM:-}" ]]; then
    cargo build --release -p vmm --quiet
    VMM="${CARGO_TARGET_DIR:-target}/release/vmm"
fi
mkdir -p "$OUT"
results="$OUT/bench-results.jsonl"
: >"$results"

# `vcpu` and `handler` are one page per fault (--fault-around 1), as in the table's history;
# `vcpu-fa16` a fixed 16-page window, `vcpu-adaptive` the adaptive one (the default of
# `vmm stress`). Access patterns and fault-around: scripts/bench-patterns.sh.
mode_flags() {
    case "$1" in
    vcpu-fa16) echo "--fault-mode vcpu --fault-around 16" ;;
    vcpu-adaptive) echo "--fault-mode vcpu --fault-around adaptive" ;;
    kernel) echo "--fault-mode kernel" ;;
    *) echo "--fault-mode $1 --fault-around 1" ;;
    esac
}

started=$(date +%s)
n=0
total=$((REPEATS * $(wc -w <<<"$VCPUS") * $(wc -w <<<"$MODES") * $(wc -w <<<"$SPACES") * $(wc -w <<<"$CHURN")))
for rep in $(seq 1 "$REPEATS"); do
    for vcpus in $VCPUS; do
        for mode in $MODES; do
            for space in $SPACES; do
                for churn in $CHURN; do
                    n=$((n + 1))
                    printf '\r[%d/%d] repeat %d: %d vCPUs, %s, %s, churn %s          ' \
                        "$n" "$total" "$rep" "$vcpus" "$mode" "$space" "$churn" >&2
                    # shellcheck disable=SC2046
                    "$VMM" stress --json --vcpus "$vcpus" --pages "$PAGES" $(mode_flags "$mode") \
                        --address-space "$space" --churn "$churn" --regions "$REGIONS" \
                        --memslots "$MEMSLOTS" --seed "$rep" >>"$results"
                done
            done
        done
    done
done
echo >&2

# Plots of single runs: latency by mode, throughput under heavy churn.
for mode in $MODES; do
    # shellcheck disable=SC2046
    "$VMM" stress --json --vcpus 2 --pages "$PAGES" $(mode_flags "$mode") --regions "$REGIONS" \
        --plot "$OUT/bench-latency-$mode.svg" >/dev/null
done
"$VMM" stress --json --vcpus 2 --pages "$PAGES" --churn 10000 --regions "$REGIONS" \
    --plot-kind throughput --plot "$OUT/bench-throughput-churn.svg" >/dev/null

elapsed=$(($(date +%s) - started))
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
kvm=$(ls /sys/module 2>/dev/null | grep '^kvm' | paste -sd, -) || kvm=
{
    echo "Command: \`BENCH_PAGES=$PAGES BENCH_REPEATS=$REPEATS BENCH_MODES=\"$MODES\" BENCH_SPACES=\"$SPACES\" BENCH_VCPUS=\"$VCPUS\" BENCH_CHURN=\"$CHURN\" BENCH_REGIONS=$REGIONS scripts/bench.sh\`"
    echo
    echo "Machine: $cpu, $(nproc) CPUs, Linux $(uname -r), KVM modules: ${kvm:-unknown}; $(date -u +%Y-%m-%d). Matrix run time: ${elapsed} s."
    echo
    "$VMM" summarize "$results" --plot "$OUT/bench-faults.svg"
} >"$OUT/bench-table.md"
cat "$OUT/bench-table.md"
