#!/usr/bin/env bash
# Install the mvm-shard binary for this machine, for the GitHub Action
# (action.yml) or by hand.
#
# It downloads mvm-shard-<target>.tar.gz and SHA256SUMS from the release,
# checks the archive's SHA-256 against SHA256SUMS, and installs the binary
# into a directory it adds to $GITHUB_PATH. When the release has no archive
# (HTTP 404), it builds the action's own source with cargo instead. Any other
# failure is an error: no silent fallback. When MVM_SHARD_PREBUILT names a
# binary already on this machine, it installs that one and downloads nothing.
#
# Environment (all optional; action.yml sets the ACTION_* ones):
#   MVM_SHARD_VERSION            release tag to install (v1.2.3 or 1.2.3), or
#                                "source" to build the action's source
#   ACTION_REF                   the ref the action was used at (github.action_ref)
#   ACTION_REPOSITORY            owner/name of the action (github.action_repository)
#   ACTION_PATH                  the action's checkout (github.action_path)
#   MVM_SHARD_RELEASE_BASE_URL   default https://github.com/$ACTION_REPOSITORY/releases/download;
#                                must be https, except for loopback hosts (tests)
#   MVM_SHARD_INSTALL_DIR        default $RUNNER_TEMP/mvm-shard/bin
#   MVM_SHARD_CARGO              the cargo to build with (default: cargo)
#   MVM_SHARD_PREBUILT           path of an mvm-shard binary already on this
#                                machine (a self-hosted runner's own, one that an
#                                earlier step built, a test's): it is installed
#                                as it is, with no download, checksum or build,
#                                and MVM_SHARD_VERSION is ignored. A relative
#                                path is taken from the current directory.
#
# The version, when MVM_SHARD_VERSION is empty, is ACTION_REF if that is a
# full release tag (v1.2.3); otherwise (a major tag such as v1, a commit SHA, a
# branch, a local `uses: ./`) it is the package version in the action's own
# Cargo.toml, which the release workflow checks against each tag. Composite
# actions do not always see github.action_ref / github.action_repository, so
# both are also read from the action's path (.../_actions/OWNER/REPO/REF).
set -euo pipefail

prog="mvm-shard install"

# Escape a message for a GitHub workflow command.
gh_escape() {
  local s=$1
  s=${s//'%'/'%25'}
  s=${s//$'\r'/'%0D'}
  s=${s//$'\n'/'%0A'}
  printf '%s' "$s"
}

log() { printf '%s: %s\n' "$prog" "$*" >&2; }

die() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  if [[ "${GITHUB_ACTIONS:-}" == true ]]; then
    printf '::error title=%s::%s\n' "$prog" "$(gh_escape "$*")"
  fi
  exit 1
}

# ---- target -----------------------------------------------------------------

os=$(uname -s)
arch=$(uname -m)
case "$os/$arch" in
  Linux/x86_64 | Linux/amd64) target=x86_64-unknown-linux-gnu ;;
  Linux/aarch64 | Linux/arm64) target=aarch64-unknown-linux-gnu ;;
  Darwin/x86_64) target=x86_64-apple-darwin ;;
  Darwin/arm64 | Darwin/aarch64) target=aarch64-apple-darwin ;;
  Linux/* | Darwin/*) target="" ;; # no prebuilt binary: build from source
  *) die "mvm-shard runs on Linux and macOS runners, not on $os" ;;
esac

# ---- where the action came from ---------------------------------------------

action_path=${ACTION_PATH:-${GITHUB_ACTION_PATH:-}}
action_repository=${ACTION_REPOSITORY:-}
action_ref=${ACTION_REF:-}
if [[ "$action_path" =~ /_actions/([^/]+)/([^/]+)/([^/]+)(/|$) ]]; then
  [[ -n "$action_repository" ]] || action_repository="${BASH_REMATCH[1]}/${BASH_REMATCH[2]}"
  [[ -n "$action_ref" ]] || action_ref=${BASH_REMATCH[3]}
fi

# The package version in the action's Cargo.toml, or nothing.
cargo_toml_version() {
  local manifest="$action_path/Cargo.toml"
  [[ -n "$action_path" && -f "$manifest" ]] || return 0
  awk '
    /^[[:space:]]*\[/ { in_package = ($0 ~ /^[[:space:]]*\[package\][[:space:]]*$/) }
    in_package && /^[[:space:]]*version[[:space:]]*=/ {
      sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit
    }' "$manifest"
}

release_tag_re='^v[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$'

prebuilt=${MVM_SHARD_PREBUILT:-}

version=${MVM_SHARD_VERSION:-}
if [[ -n "$prebuilt" ]]; then
  [[ -z "$version" ]] || log "MVM_SHARD_PREBUILT is set: installing $prebuilt, not version '$version'"
  version=prebuilt
elif [[ -z "$version" ]]; then
  if [[ "$action_ref" =~ $release_tag_re ]]; then
    version=$action_ref
  else
    pkg_version=$(cargo_toml_version)
    if [[ -n "$pkg_version" ]]; then
      version="v$pkg_version"
      log "action ref '${action_ref:-<none>}' is not a release tag; using the version of the action's Cargo.toml: $version"
    else
      die "cannot tell which mvm-shard version to install: the action ref '${action_ref:-<none>}' is not a release tag and no Cargo.toml was found in the action path. Set the action's 'version' input (for example v1.2.3, or 'source' to build from source)."
    fi
  fi
fi
if [[ "$version" =~ ^[0-9] ]]; then
  version="v$version"
fi
if [[ -z "$prebuilt" && "$version" != source && ! "$version" =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]]; then
  die "invalid version '$version': expected a release tag such as v1.2.3, or 'source'"
fi

# ---- where it goes ----------------------------------------------------------

if [[ -n "${MVM_SHARD_INSTALL_DIR:-}" ]]; then
  install_dir=$MVM_SHARD_INSTALL_DIR
elif [[ -n "${RUNNER_TEMP:-}" ]]; then
  install_dir="$RUNNER_TEMP/mvm-shard/bin"
else
  die "set MVM_SHARD_INSTALL_DIR (or RUNNER_TEMP) to say where to install mvm-shard"
fi

work=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/mvm-shard-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- helpers ----------------------------------------------------------------

# sha256sum on Linux, shasum on macOS.
if command -v sha256sum >/dev/null 2>&1; then
  sha256_cmd=(sha256sum)
elif command -v shasum >/dev/null 2>&1; then
  sha256_cmd=(shasum -a 256)
else
  sha256_cmd=()
fi
sha256_of() {
  "${sha256_cmd[@]}" "$1" | awk '{ print tolower($1) }'
}

http_status=""
# fetch URL DEST: download with curl; sets http_status, returns curl's status.
fetch() {
  local rc=0
  http_status=$(curl "${curl_opts[@]}" --output "$2" --write-out '%{http_code}' "$1") || rc=$?
  return "$rc"
}

build_from_source() {
  local reason=$1
  local cargo=${MVM_SHARD_CARGO:-cargo}
  if [[ -z "$action_path" || ! -f "$action_path/Cargo.toml" ]]; then
    die "$reason, and the action's source (ACTION_PATH/Cargo.toml) is not available to build from."
  fi
  if ! command -v "$cargo" >/dev/null 2>&1; then
    die "$reason, and cargo ('$cargo') is not installed, so mvm-shard cannot be built from source. Install a Rust toolchain before this step, or set the 'version' input to a published release."
  fi
  log "$reason: building mvm-shard from the action's source with cargo (this takes a few minutes)"
  (
    unset CARGO_BUILD_TARGET
    "$cargo" build --release --locked \
      --manifest-path "$action_path/Cargo.toml" \
      --target-dir "$work/target" >&2
  ) || die "cargo build of the action's source failed"
  binary="$work/target/release/mvm-shard"
  [[ -f "$binary" ]] || die "cargo build succeeded but $binary is missing"
}

# ---- get the binary ---------------------------------------------------------

binary=""
if [[ -n "$prebuilt" ]]; then
  [[ -f "$prebuilt" ]] || die "MVM_SHARD_PREBUILT is '$prebuilt', which is not a file"
  [[ -x "$prebuilt" ]] || die "MVM_SHARD_PREBUILT is '$prebuilt', which is not executable"
  log "using the prebuilt mvm-shard at $prebuilt (MVM_SHARD_PREBUILT): nothing is downloaded"
  binary=$prebuilt
elif [[ "$version" == source ]]; then
  build_from_source "version 'source' was asked for"
elif [[ -z "$target" ]]; then
  build_from_source "there is no prebuilt mvm-shard for $os/$arch"
else
  if [[ -n "${MVM_SHARD_RELEASE_BASE_URL:-}" ]]; then
    base=$MVM_SHARD_RELEASE_BASE_URL
  elif [[ -n "$action_repository" ]]; then
    base="https://github.com/$action_repository/releases/download"
  else
    die "cannot tell which repository's releases to download from: set MVM_SHARD_RELEASE_BASE_URL, or the 'version' input to 'source'"
  fi
  base=${base%/}

  # HTTPS only, redirects included; plain HTTP only to a loopback host, which
  # never leaves this machine (the tests' fake release server).
  if [[ "$base" =~ ^https:// ]]; then
    proto='=https'
  elif [[ "$base" =~ ^http://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\])(:[0-9]+)?(/|$) ]]; then
    proto='=http'
  else
    die "refusing release base URL '$base': it must be https:// (plain http:// is allowed only for a loopback host)"
  fi
  curl_opts=(--fail --location --silent --show-error
    --proto "$proto" --proto-redir '=https'
    --connect-timeout 30 --max-time 600 --retry 3 --retry-delay 2)

  archive="mvm-shard-$target.tar.gz"
  url="$base/$version/$archive"
  log "downloading $url"
  rc=0
  fetch "$url" "$work/$archive" || rc=$?
  if [[ $rc -ne 0 ]]; then
    if [[ "$http_status" == 404 ]]; then
      build_from_source "release $version has no $archive (HTTP 404 from $url)"
    else
      die "downloading $url failed (curl exit $rc, HTTP ${http_status:-none}); not falling back to a source build"
    fi
  else
    sums_url="$base/$version/SHA256SUMS"
    rc=0
    fetch "$sums_url" "$work/SHA256SUMS" || rc=$?
    [[ $rc -eq 0 ]] || die "downloading $sums_url failed (curl exit $rc, HTTP ${http_status:-none}): cannot verify the checksum of $archive"

    expected=$(awk -v f="$archive" '$2 == f || $2 == ("*" f) { print tolower($1) }' "$work/SHA256SUMS")
    if [[ -z "$expected" ]]; then
      die "checksum: $archive is not listed in SHA256SUMS of release $version; refusing to install it"
    fi
    if [[ ! "$expected" =~ ^[0-9a-f]{64}$ ]]; then
      die "checksum: SHA256SUMS of release $version has no single valid SHA-256 for $archive (got '$(printf '%s' "$expected" | tr '\n' ' ')')"
    fi
    [[ ${#sha256_cmd[@]} -gt 0 ]] || die "neither sha256sum nor shasum is installed: cannot verify the checksum of $archive"
    actual=$(sha256_of "$work/$archive")
    if [[ "$actual" != "$expected" ]]; then
      die "checksum mismatch for $archive of release $version: SHA256SUMS says $expected, the download is $actual; refusing to install it"
    fi
    log "checksum ok: $archive sha256 $actual"

    mkdir "$work/unpacked"
    tar -xzf "$work/$archive" -C "$work/unpacked" mvm-shard ||
      die "$archive has no top-level mvm-shard binary"
    binary="$work/unpacked/mvm-shard"
    if [[ -L "$binary" || ! -f "$binary" ]]; then
      die "mvm-shard in $archive is not a regular file"
    fi
  fi
fi

# ---- install ----------------------------------------------------------------

mkdir -p "$install_dir"
dest="$install_dir/mvm-shard"
cp "$binary" "$dest.tmp.$$"
chmod 0755 "$dest.tmp.$$"
mv -f "$dest.tmp.$$" "$dest"

if ! installed=$("$dest" --version 2>&1); then
  rm -f "$dest"
  if [[ -n "$prebuilt" ]]; then
    die "the prebuilt mvm-shard at $prebuilt (MVM_SHARD_PREBUILT) does not run: $installed"
  fi
  if [[ "$binary" == "$work/unpacked/mvm-shard" ]]; then
    die "the mvm-shard of release $version does not run on this machine ($os/$arch): $installed. Release binaries for Linux are built on ubuntu-24.04 and need its glibc or newer; on an older system set the 'version' input to 'source' to build mvm-shard here with cargo."
  fi
  die "the mvm-shard built from source does not run: $installed"
fi
log "installed $installed at $dest"
if [[ -n "$prebuilt" ]]; then
  # The version is the one the binary reports ("mvm-shard 1.2.3" -> v1.2.3).
  version=$(awk 'NR == 1 { print $2 }' <<<"$installed")
  [[ ! "$version" =~ ^[0-9] ]] || version="v$version"
  [[ -n "$version" ]] || version=prebuilt
fi

if [[ -n "${GITHUB_PATH:-}" ]]; then
  printf '%s\n' "$install_dir" >>"$GITHUB_PATH"
fi
if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
  {
    printf 'path=%s\n' "$dest"
    printf 'version=%s\n' "$version"
  } >>"$GITHUB_OUTPUT"
fi
