#!/usr/bin/env bash
# Rust: build the tests once here, run them in the shards from a nextest
# archive (no Rust toolchain and no compiling in the shards). The README shows
# everything after the first blank line verbatim; tests/toolchains.rs runs it.
set -euo pipefail

cargo nextest archive --archive-file target/nextest-archive.tar.zst
mvm-shard run --local --shards 4 --include target/nextest-archive.tar.zst -- \
  cargo-nextest nextest run --archive-file target/nextest-archive.tar.zst \
  --workspace-remap . --partition count:{index}/{count}
