"""Builds kvstore._kvstore against the installed C library.

The extension links the installed shared libraries (libkvstore.so,
libkvsclient.so) found with pkg-config, with an rpath to their directory:
pkg-config knows each library's own dependencies (RocksDB, OpenBLAS, CUDA
where built), so this file does not repeat the engine's link line, and a
library rebuilt with the same SONAME serves without rebuilding the
extension. Set PKG_CONFIG_PATH to <prefix>/lib/pkgconfig for a prefix
pkg-config does not search.
"""
import os
import shlex
import subprocess

from setuptools import Extension, setup


def pkg(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "kvstore", "kvsclient"],
                             check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            "kvstore: pkg-config cannot find kvstore/kvsclient; install the C "
            "library first (cmake --install build --prefix P) and set "
            f"PKG_CONFIG_PATH=P/lib/pkgconfig ({e})")
    return shlex.split(out.stdout)


def var(name):
    out = subprocess.run(["pkg-config", f"--variable={name}", "kvstore"],
                         capture_output=True, text=True)
    return out.stdout.strip()


cflags = pkg("--cflags")
libs = pkg("--libs")
lib_dirs = [os.path.normpath(f[2:]) for f in libs if f.startswith("-L")]
version = subprocess.run(["pkg-config", "--modversion", "kvstore"],
                         capture_output=True, text=True).stdout.strip()
cuda = 1 if var("cuda").upper() in ("ON", "1", "YES", "TRUE") else 0

setup(ext_modules=[Extension(
    "kvstore._kvstore",
    sources=["src/_kvstore.c", "src/arrays.c"],
    depends=["src/kvs_py.h"],
    include_dirs=[os.path.normpath(f[2:]) for f in cflags
                  if f.startswith("-I")],
    library_dirs=lib_dirs,
    libraries=[f[2:] for f in libs if f.startswith("-l")],
    runtime_library_dirs=lib_dirs,
    define_macros=[("KVS_PY_VERSION", f'"{version}"'),
                   ("KVS_PY_HAVE_CUDA", str(cuda))],
    extra_compile_args=["-std=c11", "-D_GNU_SOURCE"],
)])
