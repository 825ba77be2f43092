#!/usr/bin/env bash
# Debian packages the tests need (run by ./install.sh --test). Idempotent; helpers append their own lines.
# chromium + chromium-driver: the browser test of `chatforge web` (the system browser, never a download);
# git + git-lfs: `chatforge publish` and the generated app's model fetch.
set -euo pipefail
PKGS="chromium chromium-driver git git-lfs"
missing=""
for p in $PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
