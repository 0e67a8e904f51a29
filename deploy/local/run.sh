#!/usr/bin/env bash
# deploy/local/run.sh: a real etcd and three kvstored on loopback, the
# smallest cluster (docs/cluster.md): each daemon registers in etcd under a
# lease, keeps R=2 replicas by repair, and stores in its own data directory.
#
#   deploy/local/run.sh start [DIR]   start etcd and 3 daemons; print the address
#   deploy/local/run.sh status [DIR]  `kvctl nodes` against it
#   deploy/local/run.sh stop [DIR]    SIGTERM every process (daemons first), wait
#
# DIR (default /tmp/kvstore-local) holds etcd's and each node's data, logs,
# port files, the auth token (mode 0600), the pids and `env`, a file to
# source: KVS_ADDR=etcd://127.0.0.1:PORT/kvstore-local and KVS_AUTH_TOKEN,
# what kvctl and the Python Client read. Only 127.0.0.1 is bound; ports are
# chosen free. Binaries: KVSTORED (default build/server/kvstored), KVCTL
# (build/client/kvctl), ETCD (etcd on PATH; Debian's etcd-server).
# KVS_LOCAL_NODES sets the node count (default 3), KVS_LOCAL_REPLICAS R
# (default 2).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:-}
dir=${2:-/tmp/kvstore-local}
kvstored=${KVSTORED:-$root/build/server/kvstored}
kvctl=${KVCTL:-$root/build/client/kvctl}
nodes=${KVS_LOCAL_NODES:-3}
replicas=${KVS_LOCAL_REPLICAS:-2}
prefix=/kvstore-local

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for SECONDS CMD...: until CMD succeeds
    local n=$(($1 * 10))
    shift
    while ! "$@" >/dev/null 2>&1; do
        n=$((n - 1))
        [ $n -gt 0 ] || return 1
        sleep 0.1
    done
}

stop_all() {
    [ -f "$dir/pids" ] || return 0
    # daemons first (they deregister from etcd), etcd last
    tac "$dir/pids" | while read -r name pid; do
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 200); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "deploy/local: $name ($pid) ignored SIGTERM for 20 s: killed" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/pids"
}

case "$cmd" in
start)
    etcd=${ETCD:-$(command -v etcd || true)}
    [ -x "$etcd" ] || { echo "deploy/local: etcd not found (apt-get install etcd-server, or ETCD=...)" >&2; exit 1; }
    [ -x "$kvstored" ] || { echo "deploy/local: $kvstored not built (make build, or KVSTORED=...)" >&2; exit 1; }
    if [ -f "$dir/pids" ]; then
        echo "deploy/local: $dir has a running cluster (deploy/local/run.sh stop $dir)" >&2
        exit 1
    fi
    mkdir -p "$dir"
    trap 'echo "deploy/local: start failed; logs in $dir" >&2; stop_all' ERR
    cport=$(free_port) pport=$(free_port)
    client=http://127.0.0.1:$cport
    "$etcd" --name local --data-dir "$dir/etcd" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "http://127.0.0.1:$pport" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "local=http://127.0.0.1:$pport" \
        --log-level warn >"$dir/etcd.log" 2>&1 &
    echo "etcd $!" >>"$dir/pids"
    # etcd's v3 JSON gateway answers once it serves
    wait_for 15 python3 -c "import urllib.request as u; u.urlopen(u.Request('$client/v3/kv/range', b'{\"key\": \"AA==\"}'), timeout=1)"
    umask 077
    [ -s "$dir/token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/token"
    umask 022
    for i in $(seq 1 "$nodes"); do
        nd=$dir/node$i
        mkdir -p "$nd"
        rm -f "$nd/port"
        "$kvstored" --bind 127.0.0.1 --port 0 --http-port 0 \
            --port-file "$nd/port" --data-dir "$nd/data" \
            --auth-token-file "$dir/token" --node-id "node$i" \
            --etcd-endpoints "$client" --etcd-prefix "$prefix" \
            --etcd-lease-ttl 5 --replicas "$replicas" \
            --workers 1 --engine-threads 1 --build-threads 1 \
            >"$nd/log" 2>&1 &
        echo "node$i $!" >>"$dir/pids"
    done
    for i in $(seq 1 "$nodes"); do
        wait_for 20 grep -q '^port ' "$dir/node$i/port" ||
            { echo "deploy/local: node$i did not start:" >&2; tail -5 "$dir/node$i/log" >&2; false; }
    done
    printf 'KVS_ADDR=etcd://127.0.0.1:%s%s\nKVS_AUTH_TOKEN=%s\n' \
        "$cport" "$prefix" "$(cat "$dir/token")" >"$dir/env"
    chmod 600 "$dir/env"
    trap - ERR
    echo "deploy/local: etcd at $client, $nodes kvstored (R=$replicas) under $dir"
    echo "  set -a; . $dir/env; set +a   # then: kvctl nodes, kvctl bench, kvstore.Client(os.environ['KVS_ADDR'], ...)"
    ;;
status)
    [ -f "$dir/env" ] || { echo "deploy/local: no cluster in $dir" >&2; exit 1; }
    set -a
    # shellcheck disable=SC1091
    . "$dir/env"
    set +a
    "$kvctl" --addr "$KVS_ADDR" nodes
    ;;
stop)
    stop_all
    echo "deploy/local: stopped (data kept in $dir; rm -rf it to start empty)"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
