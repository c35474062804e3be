#!/usr/bin/env bash
# The project's test command (README "Quick start", command 2): every test of the workspace.
# Unit tests, in-process data-plane tests over loopback, and end-to-end tests of the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked
