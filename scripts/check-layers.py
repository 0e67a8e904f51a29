#!/usr/bin/env python3
"""check-layers.py: the layer rules of DESIGN.md, checked on the sources.

Every `#include "X"` of a project header in a module's sources must name a
header of that module or of a module below it (the table below is
DESIGN.md's dependency order), and no file includes another module's
private header (*_int.h, *.cuh) except the white-box tests listed in
ALLOWED_PRIVATE. The build gives each target only the include directories
of what it links; this catches what the build cannot (headers that share a
directory with a module's public one). Exit 1 with one line per violation.
"""
import os
import re
import subprocess
import sys

# module -> modules whose headers it may include (besides its own)
BELOW = {
    "include": ["common"],
    "common": ["include"],
    "kernels": ["include", "common"],
    "kernels/cuda": ["include", "common"],
    "index": ["include", "common", "kernels"],
    "buffer": ["include", "common", "kernels/cuda"],
    "engine": ["include", "common", "kernels", "kernels/cuda", "index",
               "buffer"],
    "proto": ["include", "common"],
    "server": ["include", "common", "kernels", "proto"],
    "client": ["include", "common", "proto"],
    "faiss_c": ["include", "common"],
}
LEAVES = ("tools/", "tests/", "bench/", "python/")
# white-box tests that read a module's internals on purpose
ALLOWED_PRIVATE = {
    ("tests/engine/test_lock.c", "engine_int.h"),
}
GENERATED = {"kvstore.pb-c.h": "proto"}


def module_of(path):
    parts = path.split("/")
    if parts[0] in ("tools", "tests", "bench", "python") and len(parts) > 2:
        return "/".join(parts[:2])
    if parts[0] == "kernels" and len(parts) > 2 and parts[1] == "cuda":
        return "kernels/cuda"
    return parts[0] if len(parts) > 1 else "."


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard",
         "*.c", "*.h", "*.cu", "*.cuh", "*.cpp"],
        cwd=root, capture_output=True, text=True, check=True).stdout.split()
    owner = {}
    for f in files:
        if f.endswith((".h", ".cuh")):
            owner.setdefault(os.path.basename(f), set()).add(module_of(f))
    for name, mod in GENERATED.items():
        owner.setdefault(name, set()).add(mod)
    bad = []
    inc = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
    for f in files:
        mod = module_of(f)
        with open(os.path.join(root, f), encoding="utf-8",
                  errors="replace") as fh:
            for no, line in enumerate(fh, 1):
                m = inc.match(line)
                if not m:
                    continue
                name = m.group(1)
                if "/" in name:
                    bad.append(f"{f}:{no}: include \"{name}\": one style, "
                               "the header's bare name")
                    continue
                mods = owner.get(name)
                if not mods:
                    continue  # a system or generated header
                if mod in mods:
                    continue
                private = name.endswith("_int.h") or name.endswith(".cuh")
                if private and (f, name) not in ALLOWED_PRIVATE:
                    bad.append(f"{f}:{no}: private header {name} of "
                               f"{'/'.join(sorted(mods))}")
                    continue
                if f.startswith(LEAVES):
                    continue
                allowed = BELOW.get(mod)
                if allowed is None:
                    continue
                if not mods & set(allowed):
                    bad.append(f"{f}:{no}: {mod}/ may not include {name} "
                               f"({'/'.join(sorted(mods))}/ is not below "
                               "it)")
    for b in bad:
        print("check-layers: " + b)
    if bad:
        return 1
    print(f"check-layers: {len(files)} files, includes follow the layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
