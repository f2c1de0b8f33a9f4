#!/usr/bin/env bash
# The browser test drives the app in Debian's Chromium. Install it when missing and we can (root);
# otherwise that test skips and says why.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (Debian package)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/chromium-install.log 2>&1 \
    || echo "could not install chromium (see /tmp/chromium-install.log): the browser test will be skipped"
else
  echo "chromium not found and not root: the browser test will be skipped"
fi
exit 0
