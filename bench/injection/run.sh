#!/usr/bin/env bash
# Prompt-injection detection benchmark: detection quality on the held-out
# `dev` split of the prompt-injection development set (never trained on) and
# the latency of one `Detector::inspect`.
#
# Usage: bench/injection/run.sh   (from anywhere)
# Environment:
#   WARDEN_INJECTION_DATA=/work/shared/data/prompt-injection/dev.jsonl
#   RESULTS_MD=bench/injection/latest.md   (where the report is copied)
#
# It runs `cargo bench --bench injection` (benches/injection.rs) and keeps a
# copy of the Markdown report it prints.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

export WARDEN_INJECTION_DATA="${WARDEN_INJECTION_DATA:-/work/shared/data/prompt-injection/dev.jsonl}"
RESULTS_MD="${RESULTS_MD:-bench/injection/latest.md}"

if [[ ! -f "$WARDEN_INJECTION_DATA" ]]; then
    echo "no data at $WARDEN_INJECTION_DATA (set WARDEN_INJECTION_DATA)" >&2
    exit 2
fi

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
cargo bench --bench injection | tee "$tmp"
{
    cat "$tmp"
    echo
    echo "Run: \`bench/injection/run.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, data SHA-256 $(sha256sum "$WARDEN_INJECTION_DATA" | cut -c1-16)…"
} >"$RESULTS_MD"
echo "report written to $RESULTS_MD" >&2
