# Sourced by setup.sh and test_torch_pair.sh: build_venv DEST FILL builds a virtual environment at
# DEST with $PYTHON, running `FILL PATH` to install into it while it is half built at PATH beside
# DEST; the rename at the end means an interrupted build is never reused.
build_venv() {
  local dest=$1 fill=$2
  local partial="$dest.partial-$$"
  mkdir -p "$(dirname "$dest")"
  trap 'rm -rf "'"$partial"'"' EXIT
  "$PYTHON" -m venv "$partial"
  "$fill" "$partial"
  mv "$partial" "$dest"
  trap - EXIT
  # Scripts in bin/ name the build path; point them at the final one.
  grep -rlI -- "$partial" "$dest/bin" | xargs -r sed -i "s|$partial|$dest|g"
}
