#!/usr/bin/env bash
# Build the Debian package imr_<version>_amd64.deb from this checkout, then run lintian on it.
#   scripts/build-deb.sh [OUTDIR] [VERSION]
# OUTDIR (default dist/) receives the .deb and lintian.txt. VERSION adds a changelog entry
# first (tests/test_package.py builds a newer version to test upgrades). The build runs in a
# copy of the tracked and new files, so it never writes into the checkout. Needs PyPI: the
# virtual environment is filled from debian/requirements.txt. Exit 1 on a lintian error.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
version=${2:-}
mkdir -p "$out"
work=$(mktemp -d /tmp/imr-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

src="$work/imr"
mkdir "$src"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] || [ -L "$f" ] || continue   # deleted but still tracked
  mkdir -p "$src/$(dirname "$f")" && cp -P "$f" "$src/$f"
done
if [ -n "$version" ]; then
  entry=$(printf 'imr (%s) bookworm; urgency=medium\n\n  * Test build %s.\n\n -- %s  %s\n\n' \
    "$version" "$version" "imr contributors <imr-maintainers@example.org>" "$(date -R)")
  printf '%s\n' "$entry" | cat - debian/changelog > "$src/debian/changelog"
fi
(cd "$src" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) || {
  tail -40 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
deb=$(ls "$work"/imr_*.deb)
cp "$deb" "$out/"
echo "$out/$(basename "$deb")"
# Errors fail; warnings and the rest are listed (docs/packaging.md says why each remains).
lintian --no-tag-display-limit --fail-on error "$deb" >"$out/lintian.txt" 2>&1 || {
  cat "$out/lintian.txt" >&2; echo "build-deb: lintian found errors" >&2; exit 1; }
cat "$out/lintian.txt" >&2
