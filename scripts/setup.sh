#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent and quiet when
# everything is present. Today that is only the Rust toolchain pinned in rust-toolchain.toml
# (rustup fetches it if missing); the tests themselves use loopback sockets only.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install rustup (https://rustup.rs) first" >&2
  exit 1
fi
