#!/usr/bin/env bash
# Install the build into a temporary prefix, then build and run a program
# outside the tree against it both ways: pkg-config and find_package.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR C_COMPILER
set -eu
build=$1 src=$2 cc=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

cmake --install "$build" --prefix "$prefix" >/dev/null

# Only the public headers are installed.
headers=$(cd "$prefix/include/kvstore" && ls | sort | tr '\n' ' ')
[ "$headers" = "kvs_client.h kvs_common.h kvstore.h " ] ||
    { echo "unexpected installed headers: $headers"; exit 1; }

pcdir=$(dirname "$(find "$prefix" -name kvstore.pc)")
libdir=$(dirname "$pcdir")
for lib in libkvstore.so.0 libkvsclient.so.0; do
    soname=$(objdump -p "$libdir/$lib" | awk '/SONAME/ {print $2}')
    [ "$soname" = "$lib" ] || { echo "$lib: SONAME '$soname'"; exit 1; }
done

# 1. pkg-config (the prefix comes from the .pc file's own place).
flags=$(PKG_CONFIG_PATH=$pcdir pkg-config --cflags --libs kvstore kvsclient)
"$cc" -std=c11 -Wall -Wextra -Werror -o "$tmp/consumer_pc" \
    "$src/tests/install/consumer/main.c" $flags -lm -Wl,-rpath,"$libdir"
"$tmp/consumer_pc"

# 2. find_package(kvstore).
cmake -S "$src/tests/install/consumer" -B "$tmp/b" \
    -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" >/dev/null
cmake --build "$tmp/b" >/dev/null
"$tmp/b/consumer"
echo "install test: pkg-config and find_package ok"
