#!/usr/bin/env bash
# The README's main job (make demo): the engine demo, streaming a 32K-token
# context into libkvstore and comparing wave with exact attention.
set -euo pipefail
build=${1:-build}
"$build/tools/kvdemo/kvdemo" --tokens 32768 --queries 16
