#!/usr/bin/env bash
# Bounded fuzz run of every cargo-fuzz target in fuzz/ (fuzz/README.md): installs cargo-fuzz
# when missing, builds all targets, then runs each for FUZZ_SECONDS (default 20) seconds from
# its corpus in fuzz/corpus/<target>/, with fuzz/dict/<target>.dict when there is one. Fails
# when any target crashes, times out or runs out of memory; the input that did it is in
# fuzz/artifacts/<target>/, the log in fuzz/target/logs/.
#
#   scripts/fuzz.sh                       # every target, 20 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh      # longer
#   scripts/fuzz.sh config tcp_token      # only these targets
#
# Environment: FUZZ_SECONDS (per target), FUZZ_TOOLCHAIN (a nightly, default `nightly`),
# FUZZ_SANITIZER (address, default, or none for more exec/s), FUZZ_ARGS (extra libFuzzer
# flags), CARGO_FUZZ_VERSION (installed when cargo-fuzz is missing), CARGO_BUILD_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-address}
cargo_fuzz_version=${CARGO_FUZZ_VERSION:-0.13.2}
log_dir=fuzz/target/logs

# libFuzzer and the sanitizers need a nightly compiler (rust-toolchain.toml pins a stable one).
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

build_start=$(date +%s)
cargo "+$toolchain" fuzz build --sanitizer "$sanitizer"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - build_start)) s"

mkdir -p "$log_dir"
failed=()
summary=()
for target in "${targets[@]}"; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  log=$log_dir/$target.log
  dict=()
  if [ -f "fuzz/dict/$target.dict" ]; then
    dict=("-dict=fuzz/dict/$target.dict")
  fi
  echo "fuzz: $target for $seconds s (log $log)"
  # -timeout: one input taking over 10 s is a finding (and would outlast -max_total_time).
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  if cargo "+$toolchain" fuzz run --sanitizer "$sanitizer" "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$target")
    tail -n 60 "$log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  per_sec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  units=$(find "$corpus" -type f | wc -l)
  bytes=$(find "$corpus" -type f -printf '%s\n' | awk '{ n += $1 } END { print n + 0 }')
  summary+=("$(printf '%-18s %-6s %10s execs %7s exec/s  corpus %5s files %9s bytes' \
    "$target" "$status" "${execs:-?}" "${per_sec:-?}" "$units" "$bytes")")
done

echo
echo "fuzz: summary ($seconds s per target, sanitizer $sanitizer)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: ${failed[*]} failed; inputs in fuzz/artifacts/<target>/, reproduce with" >&2
  echo "  cargo +$toolchain fuzz run <target> fuzz/artifacts/<target>/<file>" >&2
  exit 1
fi
