#!/usr/bin/env bash
# Lazy restore from a snapshot, measured: for each guest size, the `pattern` guest writes all
# of its RAM, is snapshotted with --stop, and is restored in every mode (vcpu, handler,
# kernel, eager) x fault-around 1 / 16 / adaptive (vcpu, handler) x prefetch none / ws, with
# the restored guest reading 10 % or 100 % of the pages it wrote (its working set, `--pages`)
# in one verify pass. Each run reports (`vmm run --json`, "restore"): process start to the
# first guest instruction, to the working set resident (the guest's mark after its first
# pass), first-read p50/p99 (guest rdtsc), pages populated against pages touched, and RSS.
#
# The working set replayed by `--prefetch ws` is recorded by the restore just before the
# prefetching runs: `vcpu` mode, fault-around 1, no prefetch (exactly the pages read, in the
# order read); that run is also the table's vcpu / 1 / none row.
#
# Every configuration runs RESTORE_REPEATS times, repeats the outer loop; the table and target
# ratios come from the medians of this one invocation. Writes under docs/ (or $RESTORE_OUT):
#
#   restore-results.jsonl   every run's summary with its configuration
#   restore-table.md        the Markdown table, target ratios, command and machine
#   restore-SIZE.svg        time to resident working set per configuration, one per size
#
# Knobs (environment): RESTORE_SIZES ("64M 512M 2G"), RESTORE_WS ("10 100"), RESTORE_REPEATS
# (3), RESTORE_OUT (docs), RESTORE_TMP (a fresh directory under /tmp: the snapshots, about the
# sizes together), VMM (the binary; default: built with cargo, release).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${RESTORE_SIZES:-64M 512M 2G}
WSS=${RESTORE_WS:-10 100}
REPEATS=${RESTORE_REPEATS:-3}
OUT=${RESTORE_OUT:-docs}
TMP=${RESTORE_TMP:-$(mktemp -d /tmp/vmm-restore-bench.XXXXXX)}

if [[ -z "${VMM:-}" ]]; then
    cargo build --release -p vmm --quiet
    VMM="${CARGO_TARGET_DIR:-target}/release/vmm"
fi
mkdir -p "$OUT" "$TMP"
results="$OUT/restore-results.jsonl"
: >"$results"
cleanup() {
    [[ -z "${RESTORE_TMP:-}" ]] && rm -rf "$TMP"
    return 0
}
trap cleanup EXIT

# Snapshot a `pattern` guest of SIZE that has written all its RAM.
snapshot() {
    local size=$1 dir=$2 sock="$TMP/vm.sock" log="$TMP/vm.log"
    rm -rf "$dir" "$sock"
    "$VMM" run --workload pattern --vcpus 2 --mem "$size" --api-sock "$sock" --timeout 600 \
        >"$log" 2>&1 &
    local pid=$!
    for _ in $(seq 1200); do
        [[ $(grep -c ' ready' "$log" || true) -ge 2 ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; return 1; }
        sleep 0.1
    done
    "$VMM" ctl --api-sock "$sock" snapshot --dir "$dir" --stop >&2
    wait "$pid"
}

# One restore; appends its row.
restore() {
    local size=$1 ws=$2 pages=$3 mode=$4 fa=$5 pf=$6 dir=$7 out status
    local flags=(--restore "$dir" --restore-mode "$mode" --prefetch "$pf" --pages "$pages"
        --passes 1 --restore-verify meta --timeout 600 --json)
    [[ "$fa" != - ]] && flags+=(--fault-around "$fa")
    status=0
    out=$("$VMM" run "${flags[@]}" 2>"$TMP/restore.err") || status=$?
    if ! jq -e .restore <<<"$(tail -n1 <<<"$out")" >/dev/null 2>&1; then
        echo "restore $size $ws% $mode $fa $pf: no summary (status $status)" >&2
        cat "$TMP/restore.err" >&2
        return 1
    fi
    # The host frees a big VM's memory and KVM metadata for a while after it exits: let that
    # settle so that it does not land in the next run's start-up.
    [[ "$mode" == eager ]] && sleep 1
    tail -n1 <<<"$out" | jq -c --arg size "$size" --argjson ws "$ws" --arg mode "$mode" \
        --arg fa "$fa" --arg pf "$pf" --argjson status "$status" \
        '{bench: "restore", size: $size, ws_percent: $ws, mode: $mode, fault_around: $fa,
          prefetch: $pf, status: $status, restore: .restore}' >>"$results"
}

# (mode, fault-around) without prefetch, the recording run last; then with prefetch.
NONE="handler 1
handler 16
handler adaptive
vcpu 16
vcpu adaptive
kernel -
eager -
vcpu 1"
WS="vcpu 1
vcpu 16
vcpu adaptive
handler 1
handler 16
handler adaptive
kernel -"

started=$(date +%s)
for size in $SIZES; do
    dir="$TMP/snap-$size"
    printf 'snapshot of a %s guest...\n' "$size" >&2
    snapshot "$size" "$dir"
    ram=$(jq '[.regions[] | select(.kind == "ram") | .size] | add' "$dir/manifest.json")
    per=$((ram / 4096 / 2))
    for rep in $(seq 1 "$REPEATS"); do
        for ws in $WSS; do
            pages=$((per * ws / 100))
            [[ $pages -lt 1 ]] && pages=1
            while read -r mode fa; do
                printf '\r%s %s%% repeat %d: %s fa %s prefetch none          ' "$size" "$ws" "$rep" "$mode" "$fa" >&2
                restore "$size" "$ws" "$pages" "$mode" "$fa" none "$dir"
            done <<<"$NONE"
            while read -r mode fa; do
                printf '\r%s %s%% repeat %d: %s fa %s prefetch ws            ' "$size" "$ws" "$rep" "$mode" "$fa" >&2
                restore "$size" "$ws" "$pages" "$mode" "$fa" ws "$dir"
            done <<<"$WS"
        done
    done
    echo >&2
    rm -rf "$dir"
done

elapsed=$(($(date +%s) - started))
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
kvm=$(ls /sys/module 2>/dev/null | grep '^kvm' | paste -sd, -) || kvm=
{
    echo "Command: \`RESTORE_SIZES=\"$SIZES\" RESTORE_WS=\"$WSS\" RESTORE_REPEATS=$REPEATS scripts/restore-bench.sh\`"
    echo
    echo "Machine: $cpu, $(nproc) CPUs, Linux $(uname -r), KVM modules: ${kvm:-unknown}; $(date -u +%Y-%m-%d). Run time: ${elapsed} s. 2 vCPUs; medians of $REPEATS."
    echo
    "$VMM" summarize "$results" --plot "$OUT/restore.svg"
} >"$OUT/restore-table.md"
cat "$OUT/restore-table.md"
