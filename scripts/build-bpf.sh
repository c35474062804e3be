#!/usr/bin/env bash
# Builds the kernel fast path's BPF object (SPEC §11) from dataplane/bpf/fastpath.bpf.c into
# dataplane/bpf/fastpath.bpf.o, which is checked in and embedded by the default `cargo build`
# (so building the proxy needs no BPF tool chain). Needs clang and the kernel's UAPI and libbpf
# headers: Debian's `clang libbpf-dev` (installed here when root and missing).
#
#   scripts/build-bpf.sh          rebuild the object in place
#   scripts/build-bpf.sh --check  rebuild into a temporary file and fail when it differs from
#                                 the checked-in object (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
src=dataplane/bpf/fastpath.bpf.c
obj=dataplane/bpf/fastpath.bpf.o
if ! command -v clang >/dev/null 2>&1 || ! command -v llvm-strip >/dev/null 2>&1 \
  || [ ! -e /usr/include/bpf/bpf_helpers.h ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "build-bpf: installing clang, llvm and libbpf-dev" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang llvm \
        libbpf-dev >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends clang llvm libbpf-dev >/dev/null; }; }
  else
    echo "build-bpf: clang, llvm and libbpf-dev are needed (apt-get install clang llvm libbpf-dev)" >&2
    exit 1
  fi
fi
strip_tool=$(command -v llvm-strip || command -v llvm-strip-14 || true)
if [ -z "$strip_tool" ]; then
  echo "build-bpf: llvm-strip is needed (apt-get install llvm)" >&2
  exit 1
fi
build() {
  # -g keeps BTF (the loader reads the maps' layouts from it); DWARF is stripped after. The
  # source path is recorded relative to the checkout (-fdebug-prefix-map), so the object
  # depends only on the source and clang's version, not on where the repository lies.
  clang -O2 -g -Wall -Werror -target bpf -fdebug-prefix-map="$PWD=." \
    -I"/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)" \
    -c "$src" -o "$1"
  "$strip_tool" -g "$1"
}
if [ "${1:-}" = --check ]; then
  tmp=$(mktemp /tmp/fastpath.XXXXXX.o)
  trap 'rm -f "$tmp"' EXIT
  build "$tmp"
  if ! cmp -s "$tmp" "$obj"; then
    echo "build-bpf: $obj differs from what $src builds ($(clang --version | head -1));" \
      "run scripts/build-bpf.sh and commit the object" >&2
    exit 1
  fi
  echo "build-bpf: $obj matches its source"
else
  build "$obj"
  echo "build-bpf: wrote $obj ($(stat -c %s "$obj") bytes)"
fi
