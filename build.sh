#!/bin/sh
# build.sh builds the sluice binary with its version and commit stamped in,
# so that `sluice version`, the start-up log line and sluice_build_info
# name the build even where .git is absent (a Docker build, a tarball).
#
#   ./build.sh                                   # ./sluice, named from git
#   VERSION=v1.2.0 COMMIT=0123abcd ./build.sh    # named by the caller
#   OUT=/out/sluice GOOS=linux GOARCH=arm64 ./build.sh
#
# Without git and without VERSION/COMMIT, the binary falls back to what the
# go command recorded, "(devel) commit unknown" at worst. Extra arguments
# go to go build.
set -eu
cd "$(dirname "$0")"
if [ -z "${VERSION:-}" ]; then
  VERSION=$(git describe --tags --always --dirty 2>/dev/null || true)
fi
if [ -z "${COMMIT:-}" ]; then
  COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
  if [ -n "$COMMIT" ] && ! git diff --quiet HEAD 2>/dev/null; then
    COMMIT="$COMMIT-modified"
  fi
fi
# The package path follows the module path, whatever go.mod names it.
pkg="$(go list -m)/version"
exec go build -trimpath \
  -ldflags "-s -w -X '$pkg.version=$VERSION' -X '$pkg.commit=$COMMIT'" \
  -o "${OUT:-sluice}" "$@" .
