#!/usr/bin/env bash
# The project's test command: every unit, integration, doc and end-to-end test, then the loom
# models of the RCU protocol. KVM tests skip (with the reason) where /dev/kvm is missing, unless
# VMM_REQUIRE_KVM=1, which turns such a skip into a failure (.ci/run sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (workspace, release profile)"
cargo test --workspace --release

echo "== loom models (RUSTFLAGS=--cfg loom)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
  cargo test -p rcu --release --test loom --test loom_bonsai
