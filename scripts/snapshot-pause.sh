#!/usr/bin/env bash
# How long a snapshot pauses the guest: `vmm ctl snapshot` against `vmm ctl snapshot --live`,
# taken alternately from one running VM (plain, live, plain, live, ...) so that both see the
# same host load, for the `pattern` guest that only reads its memory after writing it once,
# and for the same guest with `--rewrite` (it rewrites all of its memory in every pass).
# Each snapshot is restored once with one verify pass (exit 0 only if every word matched).
# Prints every sample and a Markdown table of medians.
#
#   scripts/snapshot-pause.sh                 # 2 GiB guests, 3 pairs each
#   PAUSE_MEM=512M PAUSE_PAIRS=5 scripts/snapshot-pause.sh
#
# Knobs (environment): PAUSE_MEM (2G), PAUSE_PAIRS (3), PAUSE_TMP (a fresh directory under
# /tmp: one snapshot at a time), VMM (the binary; default: built with cargo, release).
# The first snapshot of a fresh VM is slower (the host backs the copy buffers and page cache
# the first time) and is taken but not counted.
set -euo pipefail
cd "$(dirname "$0")/.."

MEM=${PAUSE_MEM:-2G}
PAIRS=${PAUSE_PAIRS:-3}
TMP=${PAUSE_TMP:-$(mktemp -d /tmp/vmm-snapshot-pause.XXXXXX)}
if [[ -z "${VMM:-}" ]]; then
    cargo build --release -p vmm --quiet
    VMM="${CARGO_TARGET_DIR:-target}/release/vmm"
fi
mkdir -p "$TMP"
cleanup() {
    [[ -n "${pid:-}" ]] && kill "$pid" 2>/dev/null
    [[ -z "${PAUSE_TMP:-}" ]] && rm -rf "$TMP"
    return 0
}
trap cleanup EXIT

median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# One snapshot of the VM at $sock; prints "paused_ms total_ms rounds recopied" and checks
# that it restores clean.
snap() {
    local dir="$TMP/snap" reply
    rm -rf "$dir"
    reply=$("$VMM" ctl --api-sock "$sock" --json snapshot --dir "$dir" "$@")
    "$VMM" run --restore "$dir" --restore-verify meta --passes 1 >/dev/null 2>"$TMP/restore.err" || {
        cat "$TMP/restore.err" >&2
        return 1
    }
    rm -rf "$dir"
    jq -r '.result | "\(.paused_ms) \(.total_ms) \(.precopy_rounds // "-") \(.recopied_pages // "-")"' <<<"$reply"
}

rows=()
for guest in pattern "pattern --rewrite"; do
    sock="$TMP/vm.sock" log="$TMP/vm.log"
    rm -f "$sock"
    # shellcheck disable=SC2086
    "$VMM" run --workload $guest --vcpus 2 --mem "$MEM" --api-sock "$sock" --timeout 3600 \
        >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1200); do
        [[ $(grep -c ' ready' "$log" || true) -ge 2 ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    snap >/dev/null
    plain=() live=() plain_total=() live_total=() recopied=() rounds=()
    for i in $(seq 1 "$PAIRS"); do
        read -r p t _ _ < <(snap)
        plain+=("$p") plain_total+=("$t")
        read -r p t r n < <(snap --live)
        live+=("$p") live_total+=("$t") rounds+=("$r") recopied+=("$n")
        printf '%s, pair %d: plain paused %.1f ms; live paused %.1f ms (%s rounds, %s pages again in the pause)\n' \
            "$guest" "$i" "${plain[-1]}" "${live[-1]}" "$r" "$n" >&2
    done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    pid=
    mp=$(printf '%s\n' "${plain[@]}" | median)
    ml=$(printf '%s\n' "${live[@]}" | median)
    mpt=$(printf '%s\n' "${plain_total[@]}" | median)
    mlt=$(printf '%s\n' "${live_total[@]}" | median)
    mr=$(printf '%s\n' "${recopied[@]}" | median)
    rows+=("$(printf '| `%s` | %.1f | %.1f | %.3f | %.0f | %.0f | %s |' "$guest" "$mp" "$ml" \
        "$(echo "$ml / $mp" | bc -l)" "$mpt" "$mlt" "$mr")")
done

echo "Command: \`PAUSE_MEM=$MEM PAUSE_PAIRS=$PAIRS scripts/snapshot-pause.sh\` ($(nproc) CPUs, Linux $(uname -r), $(date -u +%Y-%m-%d)); medians of $PAIRS alternating pairs, $MEM guests on 2 vCPUs."
echo
echo "| guest | paused, plain (ms) | paused, \`--live\` (ms) | live / plain | on disk, plain (ms) | on disk, live (ms) | pages copied again in the live pause |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
