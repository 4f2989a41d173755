#!/bin/sh
# The browser tests drive Debian's Chromium (Playwright's own browser download does not work offline).
# Install it when missing and we are allowed to; otherwise the browser tests report why they skip.
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the browser tests..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; browser tests will be skipped"
else
    echo "note: /usr/bin/chromium missing and not root; browser tests will be skipped"
fi
exit 0
