#!/usr/bin/env bash
# scripts/demo-main.sh [BUILD_DIR]: the README's main job, end to end.
#
# 1. starts kvstored with its default configuration, its data in a fresh
#    ./data/kvstored (only the ports differ: ephemeral, read back from a port
#    file, so that the demo never collides with another daemon on 7700);
# 2. waits until it listens;
# 3. runs kvdecode on a real model (tinycode128, byte-level) with a prompt
#    of this project's own C sources (text the model never saw), its
#    attention served by the daemon in store-wave mode: prefill, wait for
#    the wave index, then greedy generation, printed as it comes;
# 4. runs the same prompt in-process with `full` attention, teacher-forced on
#    the daemon run's tokens (kvdecode --follow), and prints the greedy
#    agreement: at how many steps full attention picks the same token;
# 5. stops the daemon with SIGTERM and checks that it exits 0.
#
# Environment: KVS_DEMO_MODEL (default ../shared/data/tinycode128.bin; a
# non-byte model such as stories260K.bin gets BOS alone as its prompt),
# KVS_DEMO_CTX (prompt tokens; default: the model's context less the
# generated tokens and a margin, 32512 for tinycode128, where a decode
# step through the index is clearly cheaper than full attention),
# KVS_DEMO_GEN (generated tokens, default 200). About 3 minutes on 2 cores
# (two 32K prefills: the daemon's and the in-process reference's).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
model=${KVS_DEMO_MODEL:-../shared/data/tinycode128.bin}
gen=${KVS_DEMO_GEN:-200}
# llama2.c header: 7 int32, seq_len last
seq_len=$(od -An -t d4 -j 24 -N 4 "$model" 2>/dev/null | tr -d ' ')
ctx=${KVS_DEMO_CTX:-$(( ${seq_len:-8704} - gen - 56 ))}
kvstored=$build/server/kvstored
kvdecode=$build/tools/kvdecode/kvdecode
for b in "$kvstored" "$kvdecode"; do
    [ -x "$b" ] || { echo "demo-main: $b missing; build first:" \
        "cmake --build $build --target kvstored kvdecode" >&2; exit 1; }
done
[ -f "$model" ] || { echo "demo-main: model $model not found" >&2; exit 1; }

run=./data/kvstored
rm -rf "$run"
mkdir -p "$run"
tmp=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---- 1, 2: the daemon
"$kvstored" --data-dir "$run/data" --port 0 --http-port 0 --deterministic yes \
    --port-file "$run/ports" >"$run/kvstored.log" 2>&1 &
pid=$!
for _ in $(seq 1 500); do
    [ -s "$run/ports" ] && grep -q '^http_port' "$run/ports" && break
    kill -0 "$pid" 2>/dev/null || { cat "$run/kvstored.log" >&2;
        echo "demo-main: kvstored exited at startup" >&2; exit 1; }
    sleep 0.02
done
port=$(awk '$1 == "port" {print $2}' "$run/ports")
http=$(awk '$1 == "http_port" {print $2}' "$run/ports")
[ -n "$port" ] || { echo "demo-main: kvstored did not start" >&2; exit 1; }
if command -v curl >/dev/null; then
    curl -fsS "http://127.0.0.1:$http/healthz" >/dev/null ||
        { echo "demo-main: /healthz failed" >&2; exit 1; }
fi
echo "== kvstored pid $pid on 127.0.0.1:$port (metrics :$http), data $run/data"

# ---- 3: generation through the daemon
input=()
if [ "$(od -An -t d4 -j 20 -N 4 "$model" | tr -d ' ')" = 256 ] ||
   [ "$(od -An -t d4 -j 20 -N 4 "$model" | tr -d ' ')" = -256 ]; then
    # Byte model: the project's C sources, sorted, first ctx - 1 bytes.
    find engine index kernels common server client -name '*.c' -print0 |
        LC_ALL=C sort -z | xargs -0 cat 2>/dev/null |
        head -c "$((ctx - 1))" >"$tmp/prompt.txt" || true
    input=(--text "$tmp/prompt.txt")
    echo "== prompt: $(wc -c <"$tmp/prompt.txt") bytes of kvstore C sources;" \
        "last lines:"
    tail -n 3 "$tmp/prompt.txt"
    echo
fi
url=tcp://127.0.0.1:$port
echo "== $(basename "$model"), store-wave via $url, $gen greedy tokens:"
"$kvdecode" "$model" "${input[@]}" --attn store-wave --store "$url" \
    --wait-indexed --gen "$gen" --gen-out "$tmp/wave.tok" 2>"$tmp/wave.log"
cat "$tmp/wave.log"

# ---- 4: full attention in-process on the same tokens
"$kvdecode" "$model" "${input[@]}" --attn full --follow "$tmp/wave.tok" \
    --quiet >"$tmp/full.out" 2>"$tmp/full.log"
cat "$tmp/full.log"

# ---- 5: stop the daemon
kill -TERM "$pid"
set +e
wait "$pid"
status=$?
set -e
pid=
tail -n 1 "$run/kvstored.log"

rate() { sed -n 's/.*steps=[0-9]* (\([0-9.]*\) tok\/s.*/\1/p' "$1"; }
exact=$(sed -n 's/.* attend: \([0-9.]*%\) keys exact.*/\1/p' "$tmp/wave.log")
agree=$(awk '$1 == "agreement" {print $2}' "$tmp/full.out")
echo
echo "decode via kvstored (store-wave): $(rate "$tmp/wave.log") tokens/s," \
    "${exact:-?} of keys attended exactly"
echo "decode in-process (full):         $(rate "$tmp/full.log") tokens/s"
echo "greedy agreement with full attention: $agree steps"
echo "kvstored exit status after SIGTERM: $status"
[ "$status" = 0 ] || { echo "demo-main: kvstored exited $status" >&2; exit 1; }
