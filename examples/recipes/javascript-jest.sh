#!/usr/bin/env bash
# JavaScript: jest's own sharding, with node_modules installed from the
# project's package-lock.json. The README shows everything after the first
# blank line verbatim; tests/toolchains.rs runs it.
set -euo pipefail

mvm-shard run --local --shards 2 -- \
  sh -c 'npm ci --no-audit --no-fund && npx jest --ci --verbose --shard={index}/{count}'
