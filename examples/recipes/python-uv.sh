#!/usr/bin/env bash
# Python: pytest with uv and pytest-split, the virtualenv built from the
# project's uv.lock once and then restored from the dependency cache. The
# README shows everything after the first blank line verbatim;
# tests/toolchains.rs runs it.
set -euo pipefail

mvm-shard run --local --shards 2 --cache .venv=uv.lock -- \
  sh -c 'uv sync --frozen && uv run --frozen python -m pytest -v --splits {count} --group {index}'
