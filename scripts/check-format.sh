#!/usr/bin/env bash
# check-format.sh: every C, C++ and CUDA source git tracks is formatted as
# the committed .clang-format says (Debian's clang-format). Run by
# `make test`; `scripts/check-format.sh --fix` rewrites the files instead.
set -euo pipefail
cd "$(dirname "$0")/.."
fix=false
[ "${1:-}" = --fix ] && fix=true
bad=0
while IFS= read -r f; do
    if $fix; then
        clang-format -i "$f"
    elif ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
        echo "check-format: $f is not formatted (scripts/check-format.sh --fix)"
        bad=1
    fi
done < <(git ls-files '*.c' '*.h' '*.cu' '*.cuh' '*.cpp')
[ $bad = 0 ] && ! $fix && echo "check-format: every source is formatted"
exit $bad
