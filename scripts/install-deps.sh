#!/usr/bin/env bash
# Installs, with apt-get, exactly the Debian packages kvstore needs to build,
# test and benchmark. Idempotent: when everything is present it only checks
# (dpkg-query) and returns in well under a second; `apt-get update` runs only
# when something is missing. Needs root (or sudo) for the install itself.
set -eu

packages=(
    build-essential cmake pkg-config git python3
    libfaiss-dev libopenblas-dev
    librocksdb-dev
    libuv1-dev
    etcd-server   # tests/cluster: a real etcd on loopback (docs/cluster.md)
    libprotobuf-c-dev protobuf-c-compiler
    libcmocka-dev
    clang libclang-rt-14-dev clang-format
    gnuplot-nox redis-server redis-tools
    python3-dev python3-setuptools python3-pip python3-venv
    python3-numpy python3-pytest python3-yaml
    yamllint        # tests/deploy: the Kubernetes manifests
    python3-torch   # python/tests/test_torch.py; large: 174 packages, ~580 MiB
)

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = installed ] || missing+=("$p")
done

[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
