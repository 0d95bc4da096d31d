#!/usr/bin/env bash
# Go: the module's packages dealt out over the shards, each package to exactly
# one shard. The README shows everything after the first blank line verbatim;
# tests/toolchains.rs runs it.
set -euo pipefail

mvm-shard run --local --shards 2 -- \
  sh -c 'go list ./... | awk "NR % {count} == {index} % {count}" | xargs -r go test -v'
