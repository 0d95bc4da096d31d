#!/usr/bin/env bash
# Python: pytest with uv and pytest-split, from the project's uv.lock. The
# README shows everything after the first blank line verbatim;
# tests/toolchains.rs runs it.
set -euo pipefail

mvm-shard run --local --shards 2 -- \
  sh -c 'uv sync --frozen && uv run --frozen pytest -v --splits {count} --group {index}'
