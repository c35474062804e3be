#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine; idempotent, quick when everything
# is present:
#   - the Rust toolchain pinned in rust-toolchain.toml (rustup fetches it on first use);
#   - for the Kubernetes suite: etcd and a kube-apiserver built from Debian's source package
#     (scripts/k8s-apiserver.sh build: root, ~7 minutes once, cached in ~/.cache/k8s-test);
#   - for the deploy/ checks: kubernetes-validate (PyPI), the offline schema checker.
# Without root the Kubernetes parts are skipped with a message (and the suite says it skipped);
# under CI=true they are required.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install rustup (https://rustup.rs) first" >&2
  exit 1
fi
need_k8s() {
  if [ "${CI:-}" = true ]; then
    echo "setup: $1 (required under CI=true)" >&2
    exit 1
  fi
  echo "setup: $1; the Kubernetes suite will be skipped" >&2
}
if ! scripts/k8s-apiserver.sh have; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: building the test kube-apiserver (once, about 7 minutes)" >&2
    scripts/k8s-apiserver.sh build
  else
    need_k8s "no test kube-apiserver and not root to build it"
  fi
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate \
    || need_k8s "cannot install kubernetes-validate"
  hash -r
fi
