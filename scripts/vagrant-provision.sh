#!/bin/bash
# Provisioning for the Vagrant boxes (../Vagrantfile), as root: set up, then
# run what CI runs.
#
#   Debian 12     ./tasks.py setup, then .ci/run (./tasks.py test) - exactly CI.
#   Ubuntu 24.04  tasks.py's set-up is Debian's apt names (linux-headers-amd64,
#   Fedora        ...), so this installs the equivalents and the .venv the way
#                 tasks.py does, then runs the same pytest suite.
#
# Every box also prints `conntracct check` (what the kernel allows, which mode
# `auto` picks) and `conntracct test` (the self-test table). Exits non-zero if
# any of the three fails.
#
# Never run by the maintainers (no Vagrant or VirtualBox where conntracct is
# developed): keep it a plain mirror of .ci/run and tasks.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
. /etc/os-release

venv() {    # as tasks.py venv(): system site packages, for the distribution's `import bcc`
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q -e ".[dev]"
}

tracefs() {     # as tasks.py tracefs(): kprobes need it mounted
    if [ -d /sys/kernel/tracing ] && [ -z "$(ls -A /sys/kernel/tracing)" ]; then
        mount -t tracefs tracefs /sys/kernel/tracing || true
    fi
}

case "$ID" in
debian)
    command -v python3 >/dev/null || { apt-get update -q && apt-get install -y -q python3; }
    ./tasks.py setup
    ;;
ubuntu)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Ubuntu's BCC is python3-bpfcc too; headers for the running kernel give BCC its tree.
    apt-get install -y -q --no-install-recommends python3-bpfcc python3-venv "linux-headers-$(uname -r)" \
        kmod iproute2 nftables conntrack iputils-ping procps
    # The servers the sink tests write to (those tests skip when one is missing).
    for server in influxdb victoria-metrics prometheus; do
        apt-get install -y -q --no-install-recommends "$server" || echo "no $server: its tests will skip"
    done
    tracefs
    venv
    ;;
fedora)
    # kernel-devel must match the running kernel (/lib/modules/$(uname -r)/build);
    # an older box kernel's comes from the updates-archive repository.
    dnf install -y python3-bcc "kernel-devel-$(uname -r)" kmod iproute nftables conntrack-tools \
        iputils procps-ng
    # No InfluxDB / VictoriaMetrics / Prometheus packages here: those sink tests skip.
    tracefs
    venv
    ;;
*)
    echo "vagrant-provision.sh: no set-up for $PRETTY_NAME" >&2
    exit 2
    ;;
esac

status=0
.venv/bin/conntracct check || status=1
.venv/bin/conntracct test || status=1
if [ "$ID" = debian ]; then
    .ci/run || status=1
else
    .venv/bin/python -m pytest tests || status=1
fi
exit "$status"
