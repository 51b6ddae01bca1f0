#!/usr/bin/env bash
# Installs the Debian packages serstream and its tests need, only where missing.
# Runtime: libportaudio2 (sounddevice), libsndfile1 (soundfile).
# Tests: espeak-ng and sox make speech, pulseaudio stands in for a microphone,
# ffmpeg sends real RTP and encodes test recordings (M4A, Opus, MP3), chromium drives the dashboard tests.
set -euo pipefail
want_runtime=(libportaudio2 libsndfile1)
want_test=(espeak-ng sox pulseaudio pulseaudio-utils ffmpeg chromium)
want=("${want_runtime[@]}")
if [ "${1:-}" = "--test" ]; then want+=("${want_test[@]}"); fi
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
