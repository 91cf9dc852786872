#!/usr/bin/env bash
# Packages the binaries already built (`cargo build --workspace --bins`, debug profile) as the
# Debian packages the container-host tests install, without building anything again:
#
#   $TARGET/debian/hosts/rollwave-agent_<v>-1_<arch>.deb   what instances bootstrap with
#   $TARGET/debian/hosts/rollwave-agent_<v>-2_<arch>.deb   the same agent, one revision up,
#                                                          for the package-upgrade test
#   $TARGET/debian/hosts/rollwave_<v>-1_<arch>.deb         the coordinator
#
# where $TARGET is CARGO_TARGET_DIR (default: target). Needs cargo-deb (tests/run installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
out="$target/debian/hosts"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is missing: cargo install --locked cargo-deb (tests/run does this)" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$out"
# --profile dev: the debug binaries the tests use; stripped (a fifth of the size) and gzip'd
# (--fast), which packs them in seconds rather than the minute xz takes.
pack() {
    cargo deb --no-build --profile dev --strip --no-dbgsym --fast --quiet --output "$out" "$@" >/dev/null
}
pack -p rollwave-agent --deb-revision 1
pack -p rollwave-agent --deb-revision 2
pack -p rollwave-coordinator --deb-revision 1
ls "$out"
