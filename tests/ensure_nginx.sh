#!/bin/sh
# The fleet test puts replicas behind Debian's nginx, configured like the Ingress.  Install it when
# missing and we are allowed to; otherwise the fleet test reports why it skips.
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian nginx for the fleet test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) \
        || echo "warning: could not install nginx; the fleet test will be skipped"
else
    echo "note: nginx missing and not root; the fleet test will be skipped"
fi
exit 0
