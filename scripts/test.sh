#!/usr/bin/env bash
# The project's test command (README "Quick start", command 2): every test of the workspace.
# Unit tests, in-process data-plane tests over loopback, end-to-end tests of the binary, and the
# Kubernetes suite against a real kube-apiserver that this script starts (and stops) when the
# machine has one (scripts/setup.sh builds it). Set UDP_DIRECTOR_K8S_RUN to use one already
# running (scripts/k8s-apiserver.sh start DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${UDP_DIRECTOR_K8S_RUN:-}" ] && scripts/k8s-apiserver.sh have; then
  run_dir=$(mktemp -d /tmp/udp-director-k8s.XXXXXX)
  trap 'scripts/k8s-apiserver.sh stop "$run_dir"; rm -rf "$run_dir"' EXIT
  scripts/k8s-apiserver.sh start "$run_dir"
  export UDP_DIRECTOR_K8S_RUN=$run_dir
fi
cargo test --workspace --locked
