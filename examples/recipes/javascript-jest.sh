#!/usr/bin/env bash
# JavaScript: jest's own sharding, with node_modules installed from the
# project's package-lock.json once and then restored from the dependency
# cache. The README shows everything after the first blank line verbatim;
# tests/toolchains.rs runs it.
set -euo pipefail

mvm-shard run --local --shards 2 --cache node_modules=package-lock.json -- \
  sh -c '{ test -d node_modules || npm ci --no-audit --no-fund; } && npx jest --ci --verbose --shard={index}/{count}'
