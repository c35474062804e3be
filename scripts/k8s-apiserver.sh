#!/usr/bin/env bash
# A real kube-apiserver (plus etcd) on loopback, for the Kubernetes test suite: no cluster, no
# containers. The API server is built once from Debian bookworm's `kubernetes` source package
# (v1.20.2, the last release Debian ships as source) with Debian's Go, and cached outside the repo.
#
#   scripts/k8s-apiserver.sh build             apt packages + build (root; ~7 min once, then cached)
#   scripts/k8s-apiserver.sh start RUN_DIR     etcd + apiserver + test CRDs (~6 s)
#   scripts/k8s-apiserver.sh restart RUN_DIR   stop and start the apiserver only (etcd keeps data)
#   scripts/k8s-apiserver.sh apiserver-stop RUN_DIR / apiserver-start RUN_DIR   the two halves
#   scripts/k8s-apiserver.sh stop RUN_DIR      stop both, by pid
#   scripts/k8s-apiserver.sh have              exit 0 when etcd and the built apiserver are here
#
# start writes RUN_DIR/kubeconfig (admin) and RUN_DIR/kubeconfig-proxy: the service account
# udp-director/udp-director, which can do only what RBAC grants it. Environment: K8S_TEST_BIN
# (cache dir, default ~/.cache/k8s-test/bin), K8S_API_PORT (6443), K8S_ETCD_PORT (23790).
# The aggregation layer is on: RUN_DIR/front-proxy-ca.crt is the CA whose client certificate the
# API server presents to an aggregated API's server (tests/common/agones.rs serves one).
set -euo pipefail
BIN_DIR=${K8S_TEST_BIN:-$HOME/.cache/k8s-test/bin}
APISERVER=$BIN_DIR/kube-apiserver
API_PORT=${K8S_API_PORT:-6443}
ETCD_PORT=${K8S_ETCD_PORT:-23790}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# The Debian source release that carries the whole upstream tree, vendor/ included.
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1

build() {
  export DEBIAN_FRONTEND=noninteractive
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
    # Source entries on the mirror the machine already uses.
    local uri
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" >/etc/apt/sources.list.d/udp-director-src.sources
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server curl openssl >/dev/null
  if [ -x "$APISERVER" ]; then echo "k8s-apiserver: cached $APISERVER"; return; fi
  apt-get install -y -qq --no-install-recommends golang-1.19-go dpkg-dev \
    golang-github-modern-go-reflect2-dev >/dev/null
  local work
  work=$(mktemp -d /tmp/kube-src.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  cd "$work"
  apt-get source -qq --download-only "kubernetes=$DEB_VERSION"
  dpkg-source -x "kubernetes_$DEB_VERSION.dsc" src >/dev/null
  # reflect2 1.0.1 as vendored crashes at run time under Go >= 1.18; Debian packages 1.0.2.
  local r=src/vendor/github.com/modern-go/reflect2
  rm -rf "$r" && mkdir -p "$r"
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.{go,s} "$r"/
  rm -f "$r"/*_test.go
  # This tree predates Go modules as Go 1.19 understands them: build it in GOPATH mode.
  mkdir -p gopath/src/k8s.io && ln -s "$work/src" gopath/src/k8s.io/kubernetes
  export PATH=/usr/lib/go-1.19/bin:$PATH GO111MODULE=off GOPATH=$work/gopath GOFLAGS= CGO_ENABLED=0
  export GOCACHE=${GOCACHE:-$HOME/.cache/k8s-test/gocache}
  cd gopath/src/k8s.io/kubernetes
  # The release tarball omits the generated OpenAPI definitions (`make generated_files`).
  go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  local dirs
  dirs=$(set +o pipefail; find -L pkg cmd plugin vendor -name '*.go' -type f \
    | xargs grep -l '^// *+k8s:openapi-gen=' \
    | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
    | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
  "$work/openapi-gen" -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r /dev/null 2>/dev/null
  local ld="-s -w" v=k8s.io/kubernetes/vendor/k8s.io
  for pkg in component-base/version client-go/pkg/version; do
    ld="$ld -X $v/$pkg.gitVersion=v1.20.2 -X $v/$pkg.gitMajor=1 -X $v/$pkg.gitMinor=20 -X $v/$pkg.gitTreeState=clean"
  done
  mkdir -p "$BIN_DIR"
  go build -ldflags "$ld" -o "$APISERVER" ./cmd/kube-apiserver
  if ! command -v kubectl >/dev/null; then
    go build -ldflags "$ld" -o "$BIN_DIR/kubectl" ./cmd/kubectl
    ln -sf "$BIN_DIR/kubectl" /usr/local/bin/kubectl
  fi
  "$APISERVER" --version
}

# The aggregation layer's certificates: a front-proxy CA, and the client certificate (CN
# front-proxy-client) the API server presents when it proxies a request to an aggregated API
# (an APIService), which that server checks against the CA before trusting X-Remote-User.
front_proxy_certs() { # RUN
  local run=$1
  [ -f "$run/front-proxy-client.crt" ] && return 0
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 3650 -subj /CN=front-proxy-ca \
    -keyout "$run/front-proxy-ca.key" -out "$run/front-proxy-ca.crt" 2>/dev/null
  openssl req -new "${ec[@]}" -subj /CN=front-proxy-client \
    -keyout "$run/front-proxy-client.key" -out "$run/front-proxy-client.csr" 2>/dev/null
  # v3 with clientAuth: Go and rustls verifiers both check the extended key usage.
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
    >"$run/front-proxy-client.ext"
  openssl x509 -req -in "$run/front-proxy-client.csr" -CA "$run/front-proxy-ca.crt" \
    -CAkey "$run/front-proxy-ca.key" -set_serial "0x$(openssl rand -hex 8)" -days 3650 \
    -extfile "$run/front-proxy-client.ext" -out "$run/front-proxy-client.crt" 2>/dev/null
  rm -f "$run/front-proxy-client.csr" "$run/front-proxy-client.ext"
}

start_apiserver() { # RUN
  local run=$1
  front_proxy_certs "$run"
  # No controller-manager runs, so: no ServiceAccount admission (it waits for token
  # controllers), no `kubernetes` Endpoints reconciler (it refuses a loopback address). Only
  # EndpointSlice v1 is served, by the CRD in tests/k8s/ (1.20 has v1beta1 only).
  # The aggregation layer is on (the tests serve `allocation.agones.dev` from a stand-in). With
  # no kube-proxy, a ClusterIP leads nowhere: the aggregator dials the Service's Endpoints (which
  # may not be loopback addresses: such a server listens in a network namespace of its own).
  setsid "$APISERVER" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --cert-dir="$run/certs" --token-auth-file="$run/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$run/sa.pub" \
    --service-account-signing-key-file="$run/sa.key" --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none --disable-admission-plugins=ServiceAccount \
    --requestheader-client-ca-file="$run/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$run/front-proxy-client.crt" \
    --proxy-client-key-file="$run/front-proxy-client.key" --enable-aggregator-routing=true \
    --runtime-config=discovery.k8s.io/v1beta1=false >"$run/apiserver.log" 2>&1 &
  echo $! >"$run/apiserver.pid"
  for _ in $(seq 1 240); do
    if [ "$(curl -sk -H 'Authorization: Bearer admin-token' "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null)" = ok ]; then
      return 0
    fi
    kill -0 "$(cat "$run/apiserver.pid")" 2>/dev/null || break
    sleep 0.25
  done
  echo "k8s-apiserver: kube-apiserver did not become ready; last log lines:" >&2
  tail -20 "$run/apiserver.log" >&2
  return 1
}

kubeconfig() { # FILE USER TOKEN RUN
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$4/ca.crt"}}]
users: [{name: $2, user: {token: $3}}]
contexts: [{name: test, context: {cluster: test, user: $2, namespace: default}}]
current-context: test
KC
}

start() { # RUN
  local run=$1
  mkdir -p "$run" && run=$(cd "$run" && pwd)
  stop "$run"
  [ -f "$run/sa.key" ] || {
    openssl genrsa -out "$run/sa.key" 2048 2>/dev/null
    openssl rsa -in "$run/sa.key" -pubout -out "$run/sa.pub" 2>/dev/null
  }
  # Static tokens: an admin, and the proxy's service account with only what RBAC gives it.
  # (Tests that need audience-bound tokens get them from the TokenRequest API.)
  cat >"$run/tokens.csv" <<T
admin-token,admin,admin,system:masters
proxy-token,system:serviceaccount:udp-director:udp-director,sa-udp-director,"system:serviceaccounts,system:serviceaccounts:udp-director"
T
  rm -rf "$run/etcd-data"
  setsid etcd --data-dir "$run/etcd-data" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-cluster "default=http://127.0.0.1:$((ETCD_PORT + 10))" >"$run/etcd.log" 2>&1 &
  echo $! >"$run/etcd.pid"
  for _ in $(seq 1 80); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && break; sleep 0.25; done
  start_apiserver "$run"
  # The self-signed serving cert file holds [cert, CA]; the CA is what clients verify against.
  awk '/BEGIN CERT/{n++} n==2' "$run/certs/apiserver.crt" >"$run/ca.crt"
  kubeconfig "$run/kubeconfig" admin admin-token "$run"
  kubeconfig "$run/kubeconfig-proxy" proxy proxy-token "$run"
  KUBECONFIG=$run/kubeconfig kubectl apply -f "$HERE/tests/k8s/crds.yaml" >/dev/null
  # udp-director's own CRDs too, before any test runs: a CRD established mid-suite makes the
  # API server rebuild its handlers while other tests' watches (EndpointSlices are a CRD here)
  # are live.
  KUBECONFIG=$run/kubeconfig kubectl apply --server-side --field-manager=test \
    -f "$HERE/deploy/crds/udp-director.dev.yaml" \
    -f "$HERE/tests/k8s/gateway-api-crds.yaml" >/dev/null
  KUBECONFIG=$run/kubeconfig kubectl wait --for condition=established --timeout=30s \
    crd/gameservers.agones.dev crd/endpointslices.discovery.k8s.io \
    crd/forwarders.udp-director.dev crd/routes.udp-director.dev \
    crd/gateways.gateway.networking.k8s.io crd/udproutes.gateway.networking.k8s.io \
    crd/prometheusrules.monitoring.coreos.com crd/podmonitors.monitoring.coreos.com >/dev/null
  echo "k8s-apiserver: ready at https://127.0.0.1:$API_PORT; KUBECONFIG=$run/kubeconfig (admin), $run/kubeconfig-proxy (service account)"
}

stop_pid() { # FILE
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop() { # RUN
  stop_pid "$1/apiserver.pid"
  stop_pid "$1/etcd.pid"
}

restart() { # RUN
  local run
  run=$(cd "$1" && pwd)
  stop_pid "$run/apiserver.pid"
  start_apiserver "$run"
}

case "${1:-}" in
  build) build ;;
  start) start "${2:?usage: $0 start RUN_DIR}" ;;
  restart) restart "${2:?usage: $0 restart RUN_DIR}" ;;
  apiserver-stop) stop_pid "${2:?usage: $0 apiserver-stop RUN_DIR}/apiserver.pid" ;;
  apiserver-start) start_apiserver "$(cd "${2:?usage: $0 apiserver-start RUN_DIR}" && pwd)" ;;
  stop) stop "${2:?usage: $0 stop RUN_DIR}" ;;
  have) [ -x "$APISERVER" ] && command -v etcd >/dev/null && command -v kubectl >/dev/null ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
