#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first: Debian's redis-server, chromium,
# ffmpeg (encodes the media the recording tests send, and checks their files) and iproute2 (the browser test runs in a network namespace with only loopback), and the Node
# packages of tests/interop (npm ci: socket.io-client, playwright-core; never a downloaded browser). Tests start their own redis-server on free
# loopback ports; nothing here needs a running service.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
command -v ffmpeg >/dev/null || missing+=(ffmpeg) # recordings are checked with ffprobe/ffmpeg
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

# A failing test prints the server's log lines captured during it (info and up, webrtc's
# warnings, the ICE/DTLS core's errors), then its message; without backtraces, so that those fit
# in the tail of the output.
export RUST_LOG="${RUST_LOG:-switchboard=info,webrtc=warn,rtc=error}"
export RUST_BACKTRACE=0
cargo test --locked --all-targets "$@"
# The library docs' examples (not among --all-targets), on a full run.
if [ $# -eq 0 ]; then cargo test --locked --doc; fi
