#!/usr/bin/env bash
# Installs what a fresh Debian machine with only the Rust toolchain lacks to build and
# test drplane: libclang (RocksDB's bindgen) and a C++ compiler, Python's venv (the
# vendors' clients in compat/), and iproute2 (`ip`, `tc`: the chaos tests' network
# namespaces; they run as root). protoc comes from a crate, so none is needed. Safe to run
# again: it installs only what is missing.
set -euo pipefail

need=()
if ! ldconfig -p 2>/dev/null | grep -q 'libclang'; then
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
fi
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "install-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
