#!/usr/bin/env bash
# Memslot windows against a memslot per region, under region churn: what one region update
# costs (beside a plain mmap + munmap of the same size, timed in the same run), what churn takes
# from the guest's first-touch throughput, and how the address spaces compare with 100,000
# regions in the tree. Writes (under docs/, or $BENCH_OUT):
#
#   bench-memslots.jsonl   every run's `vmm stress --json` object, one per line
#   bench-memslots.md      medians per configuration and the target ratios
#
# One page per exit (--fault-around 1), so that churn competes with a steady fault stream.
# Rows labelled "adaptive window" run the default fault-around instead (a vCPU fills up to 2
# MiB per exit, a 16-page chunk per read-side critical section), and "adaptive, whole windows"
# the same with VMM_FILL_WHOLE_WINDOWS=1 (a window per section): what an unmap waits for there.
# Rows labelled "unmaps in batches of 16" and "no protect" run the churn with --churn-batch 16
# (and --churn-ops map,unmap,split), to show what batching and protect each cost.
# Knobs (environment): BENCH_PAGES (pages per vCPU, default 32768), BENCH_REPEATS (default 3),
# BENCH_DURATION (seconds of fresh-VM runs averaged into each data point, default 3; one run
# for the 1,000,000-region rows),
# BENCH_OUT (default docs), VMM (the vmm binary; default: built with cargo, release).
# Repeats are the outer loop, so that drift of the host spreads over every configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

PAGES=${BENCH_PAGES:-32768}
REPEATS=${BENCH_REPEATS:-3}
DURATION=${BENCH_DURATION:-3}
OUT=${BENCH_OUT:-docs}
if [[ -z "${VMM:-}" ]]; then
    cargo build --release -p vmm --quiet
    VMM="${CARGO_TARGET_DIR:-target}/release/vmm"
fi
mkdir -p "$OUT"
results="$OUT/bench-memslots.jsonl"
: >"$results"

run() {
    printf '\r%-100s' "repeat $rep: $*" >&2
    "$VMM" stress --json --pages "$PAGES" --fault-around 1 --seed "$rep" --duration "$DURATION" "$@" >>"$results"
}

# Window mode with the holes put back to PROT_NONE (the design before armed holes), tagged.
run_prot_none() {
    printf '\r%-100s' "repeat $rep: PROT_NONE holes $*" >&2
    VMM_PROT_NONE_HOLES=1 "$VMM" stress --json --pages "$PAGES" --fault-around 1 --seed "$rep" --duration "$DURATION" \
        --memslots window "$@" | jq -c '.memslots = "window, PROT_NONE holes"' >>"$results"
}

# The churn thread mapping regions it does not populate (--churn-populate false): the mapping
# change alone, with no page to free and no TLB flush, tagged.
run_unpopulated() {
    local memslots=$1
    shift
    printf '\r%-100s' "repeat $rep: unpopulated churn $memslots $*" >&2
    "$VMM" stress --json --pages "$PAGES" --fault-around 1 --seed "$rep" --duration "$DURATION" --memslots "$memslots" \
        --churn-populate false "$@" | jq -c --arg m "$memslots, unpopulated churn" '.memslots = $m' >>"$results"
}

# The default fault-around (adaptive), tagged; extra words before the flags are environment.
run_adaptive() {
    local label=$1
    shift
    local envs=()
    while [[ $# -gt 0 && "$1" == *=* ]]; do
        envs+=("$1")
        shift
    done
    printf '\r%-100s' "repeat $rep: $label $*" >&2
    env "${envs[@]}" "$VMM" stress --json --pages "$PAGES" --seed "$rep" --duration "$DURATION" --memslots window \
        "$@" | jq -c --arg m "window, $label" '.memslots = $m' >>"$results"
}

run_batched() {
    local label=$1
    shift
    printf '\r%-100s' "repeat $rep: $label $*" >&2
    "$VMM" stress --json --pages "$PAGES" --fault-around 1 --seed "$rep" --duration "$DURATION" --memslots window \
        --churn-batch 16 "$@" | jq -c --arg m "window, $label" '.memslots = $m' >>"$results"
}

for rep in $(seq 1 "$REPEATS"); do
    for memslots in window per-region; do
        for churn in 0 1000 10000; do
            run --vcpus 2 --memslots "$memslots" --churn "$churn"
        done
    done
    for churn in 1000 10000; do
        run_prot_none --vcpus 2 --churn "$churn"
    done
    for churn in 0 10000; do
        run --vcpus 1 --memslots window --churn "$churn"
    done
    # Unmaps in batches of 16 (one TLB flush a batch), and without protects.
    for vcpus in 1 2; do
        run_batched "unmaps in batches of 16" --vcpus "$vcpus" --churn 10000
        run_batched "batches of 16, no protect" --vcpus "$vcpus" --churn 10000 --churn-ops map,unmap,split
    done
    for memslots in window per-region; do
        run_unpopulated "$memslots" --vcpus 2 --churn 1000
    done
    for churn in 0 1000 10000; do
        run_adaptive "adaptive window" --vcpus 2 --churn "$churn"
    done
    run_adaptive "adaptive, whole windows" VMM_FILL_WHOLE_WINDOWS=1 --vcpus 2 --churn 1000
    for space in bonsai rwlock cow; do
        run --vcpus 2 --memslots window --regions 100000 --churn 10000 --address-space "$space"
    done
done
# Host memory and fault latency with a million regions, against a thousand (one run each).
DURATION=0
for regions in 1000 1000000; do
    rep=1
    run --vcpus 2 --memslots window --regions "$regions" --churn 1000
done
echo >&2

python3 - "$results" "$OUT/bench-memslots.md" "$PAGES" "$REPEATS" "${BENCH_DURATION:-3}" <<'EOF'
import json, statistics, sys
path, out, pages, repeats, duration = sys.argv[1:6]
runs = [json.loads(l) for l in open(path) if l.strip()]
def key(r):
    return (r["memslots"], r["vcpus"], r["regions"], r["address_space"], r["churn_rate"])
groups = {}
for r in runs:
    groups.setdefault(key(r), []).append(r)
def med(rs, f):
    return statistics.median(f(r) for r in rs)
def get(r, path):
    for k in path.split("."):
        r = r[k]
    return r
lines = [
    "# Memslot windows vs a memslot per region (`scripts/bench-memslots.sh`)",
    "",
    f"{pages} pages per vCPU, `vcpu` fault mode, `--fault-around 1` (the rows \"adaptive\": the default window), medians of {repeats} data points, each "
    f"averaging the fresh-VM runs of {duration} s (`--duration`; one run for the "
    f"1,000,000-region rows). Command: `BENCH_PAGES={pages} BENCH_REPEATS={repeats} BENCH_DURATION={duration} scripts/bench-memslots.sh`. Op latencies are p50 (ns) of the operation alone; "
    "`mmap` is a plain anonymous `mmap` + `munmap` of the same sizes timed by the churn "
    "thread in the same run.",
    "",
    "| memslots | vCPUs | regions | address space | churn/s | first touches/s | churn ops/s "
    "| churn thread CPU | map | unmap | split | protect | mmap | memslot changes | verify errors | RSS before churn |",
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
def cpu_share(rs):
    # The churn thread's share of one CPU (reports from before it was measured have none).
    v = [r["churn"].get("cpu_share") for r in rs if r["churn_rate"] > 0]
    v = [x for x in v if x is not None]
    return f"{100 * statistics.median(v):.1f} %" if v else "-"
for k in sorted(groups, key=lambda k: (k[2], k[0] != "window", k[1], k[3], k[4])):
    rs = groups[k]
    c = lambda p: int(med(rs, lambda r: get(r, p)))
    lines.append(
        f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {med(rs, lambda r: r['faults_per_sec']):.0f} "
        f"| {med(rs, lambda r: r['churn']['ops_per_sec']):.0f} | {cpu_share(rs)} "
        f"| {c('churn.op_latency_ns.map.p50')} | {c('churn.op_latency_ns.unmap.p50')} "
        f"| {c('churn.op_latency_ns.split.p50')} | {c('churn.op_latency_ns.protect.p50')} "
        f"| {c('churn.mmap_baseline_ns.p50')} | {sum(r['kvm_memslot_changes'] for r in rs)} "
        f"| {sum(r['verify_errors'] for r in rs)} | {c('rss.before_churn_bytes') >> 20} MiB |"
    )
def fps(memslots, vcpus, churn, regions=1000, space="bonsai"):
    rs = groups.get((memslots, vcpus, regions, space, churn))
    return med(rs, lambda r: r["faults_per_sec"]) if rs else float("nan")
def op(memslots, name, regions=1000, space="bonsai", churn=1000, vcpus=2):
    # name None: the mmap + munmap baseline those runs timed.
    rs = groups.get((memslots, vcpus, regions, space, churn))
    path = f"churn.op_latency_ns.{name}.p50" if name else "churn.mmap_baseline_ns.p50"
    return med(rs, lambda r: get(r, path)) if rs else float("nan")
base = statistics.median(get(r, "churn.mmap_baseline_ns.p50") for r in runs
                         if r["memslots"] == "window" and r["churn_rate"] > 0 and r["regions"] == 1000)
lines += ["", "| target | goal | measured |", "|---|---|---|"]
for name in ["map", "unmap", "split", "protect"]:
    w, p = op("window", name), op("per-region", name)
    lines.append(f"| {name} p50 / mmap baseline p50 (window) | ≤ 10 | {w / base:.1f} ({w:.0f} / {base:.0f} ns) |")
    lines.append(f"| {name} p50 per-region / window | ≥ 50 | {p / w:.1f} ({p:.0f} / {w:.0f} ns) |")
for name in ["map", "unmap", "split", "protect"]:
    w, p = op("window, unpopulated churn", name), op("per-region, unpopulated churn", name)
    lines.append(f"| {name} p50 per-region / window, mapping change alone (churn regions not populated) | | {p / w:.1f} ({p:.0f} / {w:.0f} ns) |")
for name in ["map", "unmap", "split", "protect"]:
    w, n = op("window", name), op("window, PROT_NONE holes", name)
    lines.append(f"| {name} p50, armed holes / PROT_NONE holes (window, churn 1000) | | {w / n:.2f} ({w:.0f} / {n:.0f} ns) |")
for churn in [1000, 10000]:
    a = fps("window", 2, churn) / fps("window", 2, 0)
    n = fps("window, PROT_NONE holes", 2, churn) / fps("window", 2, 0)
    lines.append(f"| first touches/s, churn {churn} / none, 2 vCPUs: armed holes vs PROT_NONE holes | | {a:.3f} vs {n:.3f} |")
for vcpus, churn, goal in [(2, 1000, "≥ 0.95"), (2, 10000, "≥ 0.85"), (1, 10000, "≥ 0.97")]:
    w = fps("window", vcpus, churn) / fps("window", vcpus, 0)
    lines.append(f"| first touches/s, churn {churn} / none, {vcpus} vCPU(s), window | {goal} | {w:.3f} |")
for vcpus, goal in [(2, "≥ 0.85"), (1, "≥ 0.97")]:
    b = fps("window, unmaps in batches of 16", vcpus, 10000) / fps("window", vcpus, 0)
    n = fps("window, batches of 16, no protect", vcpus, 10000) / fps("window", vcpus, 0)
    lines.append(f"| the same, churn 10000, {vcpus} vCPU(s): unmaps in batches of 16 (`--churn-batch 16`) / also without protects (`--churn-ops map,unmap,split`) | {goal} | {b:.3f} / {n:.3f} |")
for name in ["map", "unmap", "split", "protect"]:
    # Each against the baseline its own runs timed.
    a, wh = op("window, adaptive window", name), op("window, adaptive, whole windows", name)
    ba, bw = op("window, adaptive window", None), op("window, adaptive, whole windows", None)
    lines.append(f"| {name} p50 / mmap baseline p50, adaptive window (a chunk per critical section / a window per section) | ≤ 10 | {a / ba:.1f} / {wh / bw:.1f} ({a:.0f} / {ba:.0f}, {wh:.0f} / {bw:.0f} ns) |")
for churn, goal in [(1000, "≥ 0.95"), (10000, "≥ 0.85")]:
    a = fps("window, adaptive window", 2, churn) / fps("window, adaptive window", 2, 0)
    lines.append(f"| first touches/s, churn {churn} / none, 2 vCPUs, adaptive window | {goal} | {a:.3f} |")
for churn in [1000, 10000]:
    p = fps("per-region", 2, churn) / fps("per-region", 2, 0)
    lines.append(f"| the same, per-region, churn {churn} (for comparison) | | {p:.3f} |")
def g(space, f):
    rs = groups.get(("window", 2, 100000, space, 10000))
    return med(rs, f) if rs else float("nan")
ops = lambda space: g(space, lambda r: r["churn"]["ops_per_sec"])
lines.append(f"| churn ops/s at 100,000 regions, bonsai / cow | ≥ 10 | {ops('bonsai') / ops('cow'):.1f} ({ops('bonsai'):.0f} / {ops('cow'):.0f}) |")
f = lambda space: g(space, lambda r: r["faults_per_sec"])
lines.append(f"| first touches/s at 100,000 regions, churn 10000, bonsai / rwlock | ≥ 1 | {f('bonsai') / f('rwlock'):.3f} |")
one = [r for r in runs if r["regions"] == 1000000]
small = [r for r in runs if r["regions"] == 1000 and r["memslots"] == "window" and r["vcpus"] == 2 and r["churn_rate"] == 1000]
if one and small:
    a, b = one[-1], small[-1]
    per = (a["rss"]["before_churn_bytes"] - b["rss"]["before_churn_bytes"]) / 999000
    lines.append(f"| 1,000,000 regions | verify clean | {a['verify_errors']} verify errors; host memory {per:.0f} B per region; "
                 f"first-touch p50 {a['fault_latency_ns']['p50']} ns vs {b['fault_latency_ns']['p50']} ns at 1,000 |")
lines.append(f"| verify errors, all runs | 0 | {sum(r['verify_errors'] for r in runs)} |")
lines.append(f"| resident bytes left in the churn area, any run | 0 | {max(r['rss']['churn_residual_bytes'] for r in runs)} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
