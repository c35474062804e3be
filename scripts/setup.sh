#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine; idempotent, quick when everything
# is present:
#   - the Rust toolchain pinned in rust-toolchain.toml (rustup fetches it on first use);
#   - for the Kubernetes suite: etcd and a kube-apiserver built from Debian's source package
#     (scripts/k8s-apiserver.sh build: root, ~7 minutes once, cached in ~/.cache/k8s-test);
#   - for the deploy/ checks: kubernetes-validate (PyPI), the offline schema checker;
#   - for the fast-path tests: ethtool (root);
#   - for the observability checks (tests/observability.rs): Debian's Prometheus, which brings
#     promtool (root; the service it ships is not started here, the test runs its own).
# Without root the Kubernetes and Prometheus parts are skipped with a message (and the suite says it skipped);
# under CI=true they are required.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install rustup (https://rustup.rs) first" >&2
  exit 1
fi
# need WHAT-IS-MISSING [WHAT-GETS-SKIPPED]: fatal under CI=true, a warning otherwise.
need() {
  if [ "${CI:-}" = true ]; then
    echo "setup: $1 (required under CI=true)" >&2
    exit 1
  fi
  echo "setup: $1; ${2:-the Kubernetes suite} will be skipped" >&2
}
need_k8s() { need "$1"; }
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
# The fast-path tests (tests/fastpath.rs) turn checksum offload off on their veth pairs.
if ! command -v ethtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ethtool \
        >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
               --no-install-recommends ethtool >/dev/null; }; } \
      || need "cannot install ethtool (apt-get install ethtool)" "tests/fastpath.rs"
    hash -r
  else
    need "no ethtool and not root to install it" "tests/fastpath.rs"
  fi
fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's prometheus (promtool and the server)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
               --no-install-recommends prometheus >/dev/null; }; } \
      || need "cannot install prometheus (apt-get install prometheus)" "tests/observability.rs"
    hash -r
  else
    need "no prometheus/promtool and not root to install them (apt-get install prometheus)" \
      "tests/observability.rs"
  fi
fi
