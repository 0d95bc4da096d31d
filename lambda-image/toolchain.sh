#!/bin/sh
# The runner toolchain of both images (the function's and the MicroVM's), in
# one place so that a suite that passes on one kind of environment finds the
# same tools on the other, and the agent's user. Runs as root at build time,
# after Rust and Go were copied under /opt by their own build stages.
# Versions follow the base image's dated Amazon Linux 2023 release: its dnf
# resolves against that release's repository snapshot, so moving the base
# tag is the upgrade and per-package pins would only repeat it. The tools from
# npm and PyPI are pinned by the Dockerfile's build arguments; an empty
# NODEJS_VERSION, UV_VERSION or JDK_VERSION leaves that toolchain out.
set -eu
lib=/usr/local/lib/mvm-shard
marks=/etc/mvm-shard/toolchains.d
mkdir -p "$marks"

packages="git gcc gcc-c++ make python3 python3-pip tar gzip xz zstd findutils procps-ng diffutils which shadow-utils"
if [ -n "${NODEJS_VERSION:-}" ]; then
  packages="$packages nodejs${NODEJS_VERSION} nodejs${NODEJS_VERSION}-npm"
fi
if [ -n "${JDK_VERSION:-}" ]; then
  packages="$packages java-${JDK_VERSION}-amazon-corretto-devel"
fi
# shellcheck disable=SC2086 # a list of package names, split on purpose
dnf install -y --nodocs --setopt=install_weak_deps=0 $packages
dnf clean all
touch "$marks/os" "$marks/build" "$marks/python"

if [ -n "${NODEJS_VERSION:-}" ]; then
  # pnpm and yarn through corepack, prepared here: at run time the image is
  # read-only and every shard has a fresh HOME, so nothing is fetched per shard.
  : "${COREPACK_VERSION:?}" "${PNPM_VERSION:?}" "${YARN_VERSION:?}" "${COREPACK_HOME:?}"
  npm install --global --no-fund --no-audit "corepack@${COREPACK_VERSION}"
  corepack enable
  corepack install --global "pnpm@${PNPM_VERSION}" "yarn@${YARN_VERSION}"
  chmod -R a+rX "$COREPACK_HOME"
  npm cache clean --force
  rm -rf /root/.npm
  touch "$marks/node"
fi
if [ -n "${UV_VERSION:-}" ]; then
  python3 -m pip install --no-cache-dir "uv==${UV_VERSION}"
  touch "$marks/uv"
fi
if [ -n "${JDK_VERSION:-}" ]; then
  touch "$marks/java"
fi

# Rust and Go, when their stages brought them, on the default PATH too (Lambda
# may start the runtime with its own PATH); rustup's proxies and go find their
# toolchain from RUSTUP_HOME and their own location.
for bin in /opt/rust/bin/* /opt/go/bin/*; do
  if [ -e "$bin" ]; then
    ln -sf "$bin" /usr/local/bin/
  fi
done

# Every command of every installed toolchain resolves, or the build fails here.
missing=""
while IFS= read -r line; do
  case "$line" in '#'* | '') continue ;; esac
  group=${line%%:*}
  [ -e "$marks/$group" ] || continue
  for command in ${line#*:}; do
    command -v "$command" >/dev/null || missing="$missing $group:$command"
  done
done <"$lib/commands.txt"
if [ -n "$missing" ]; then
  echo "toolchain.sh: missing from the image:$missing" >&2
  exit 1
fi
# And they start: a binary built against a newer glibc than AL2023's fails here.
if [ -e "$marks/rust" ]; then cargo --version && cargo nextest --version; fi
if [ -e "$marks/go" ]; then go version; fi
if [ -e "$marks/node" ]; then node --version && pnpm --version && yarn --version; fi
if [ -e "$marks/uv" ]; then uv --version; fi
if [ -e "$marks/java" ]; then javac -version; fi

# Lambda ignores USER and runs functions as an unprivileged user of its own;
# a named uid 993 makes `docker run` just as unprivileged, and its passwd
# entry keeps tools that look the current user up (git, ssh, pip) working.
groupadd --gid 993 mvm-shard
useradd --uid 993 --gid 993 --home-dir /tmp --no-create-home --shell /bin/bash mvm-shard
