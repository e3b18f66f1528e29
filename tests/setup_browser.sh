#!/bin/sh
# Headless Chromium + its WebDriver for tests/test_serve_browser.py (lens-serve in a real browser).
# Idempotent: does nothing when both are installed. Debian's packages; needs root (CI) or sudo.
set -e
if [ -x /usr/bin/chromium ] && { [ -x /usr/bin/chromedriver ] || command -v chromedriver >/dev/null 2>&1; }; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
echo "setup_browser: installing chromium and chromium-driver (apt-get)" >&2
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
