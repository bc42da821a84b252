#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first: redis-server (Debian package) and
# the Node packages of tests/interop (npm ci). Tests start their own redis-server on free
# loopback ports; nothing here needs a running service.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

cargo test --locked --all-targets "$@"
