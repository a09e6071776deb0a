#!/usr/bin/env bash
# Generates the labelled PII / secrets development set for benches/output.rs.
#
# Usage: bench/output/gen.sh [N=2000]   (from anywhere)
# Environment:
#   WARDEN_PII_GEN=/work/shared/data/pii/gen_pii.py   the Faker recipe (not
#       copied into this repo: its README states no licence for it)
#   WARDEN_PII_DATA=target/pii_dev.jsonl               where the set is written
#
# Makes a venv under target/ with faker==40.63.0 (same version => the same
# file, byte for byte) and runs the recipe. The output is not committed: the
# token-shaped values trip secret scanners on Git hosts.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
GEN="${WARDEN_PII_GEN:-/work/shared/data/pii/gen_pii.py}"
OUT="${WARDEN_PII_DATA:-target/pii_dev.jsonl}"
N="${1:-2000}"
VENV=target/pii-venv

if [[ ! -x "$VENV/bin/python" ]]; then
    mkdir -p target
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "faker==40.63.0"
fi
"$VENV/bin/python" "$GEN" "$OUT" "$N"
echo "wrote $OUT ($(wc -l <"$OUT") rows, SHA-256 $(sha256sum "$OUT" | cut -c1-16)…)" >&2
