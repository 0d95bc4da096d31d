#!/bin/sh
# The runner toolchain of both images (the function's and the MicroVM's), in
# one place so that a suite that passes on one kind of environment finds the
# same tools on the other, and the agent's user. Runs as root at build time.
# Versions follow the base image's dated Amazon Linux 2023 release: its dnf
# resolves against that release's repository snapshot, so moving the base
# tag is the upgrade and per-package pins would only repeat it.
set -eu
: "${NODEJS_VERSION:?set NODEJS_VERSION (e.g. 22)}"

dnf install -y --nodocs --setopt=install_weak_deps=0 \
    git gcc gcc-c++ make \
    python3 python3-pip \
    "nodejs${NODEJS_VERSION}" "nodejs${NODEJS_VERSION}-npm" \
    tar gzip xz zstd findutils procps-ng diffutils which shadow-utils
dnf clean all

# Lambda ignores USER and runs functions as an unprivileged user of its own;
# a named uid 993 makes `docker run` just as unprivileged, and its passwd
# entry keeps tools that look the current user up (git, ssh, pip) working.
groupadd --gid 993 mvm-shard
useradd --uid 993 --gid 993 --home-dir /tmp --no-create-home --shell /bin/bash mvm-shard
