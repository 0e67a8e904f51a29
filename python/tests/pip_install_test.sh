#!/usr/bin/env bash
# `pip install ./python` against the installed C library, as the README
# says, offline: install the build into a temporary prefix, pip-install a
# copy of python/ into a venv that sees Debian's numpy, import it there and
# run `python -m kvstore`.
# Usage: pip_install_test.sh BUILD_DIR SOURCE_DIR PYTHON
set -eu
build=$1 src=$2 py=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
pcdir=$(dirname "$(find "$tmp/prefix" -name kvstore.pc)")
"$py" -m venv --system-site-packages "$tmp/venv"
cp -r "$src/python" "$tmp/src" # pip builds in the source tree
rm -rf "$tmp/src/build" "$tmp/src"/*.egg-info
PKG_CONFIG_PATH=$pcdir "$tmp/venv/bin/pip" install -q --no-index \
    --no-build-isolation "$tmp/src"
cd "$tmp"
out=$("$tmp/venv/bin/python" -m kvstore)
echo "$out"
case "$out" in "kvstore "*"CUDA: "*) ;; *) echo "unexpected output"; exit 1 ;; esac
"$tmp/venv/bin/python" - <<'PY'
import numpy as np, kvstore
with kvstore.Store() as s:
    s.create(1, layers=1, q_heads=2, kv_heads=1, head_dim=4)
    k = np.eye(4, dtype=np.float32)[:2].reshape(2, 1, 4) * 10
    v = np.arange(8, dtype=np.float32).reshape(2, 1, 4)
    s.append(1, 0, k, v)
    out, _ = s.attend(1, 0, np.array([[10, 0, 0, 0]] * 2, np.float32),
                      mode="exact")
    assert np.allclose(out, v[0, 0], atol=1e-3), out
print("pip install test ok:", kvstore.__file__)
PY
