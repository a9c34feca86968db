# Sourced by scripts/run and scripts/test: make sure `uv` is on PATH, installing it if needed.
UV_VERSION="0.13.9"

ensure_uv() {
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null 2>&1 && return 0
  printf '==> installing uv %s (the Python package manager this project uses)\n' "$UV_VERSION" >&2
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install --quiet "uv==$UV_VERSION" 2>/dev/null \
      || python3 -m pip install --quiet --user --break-system-packages "uv==$UV_VERSION" \
      || true
  fi
  if ! command -v uv >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
    curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | sh >&2 || true
  fi
  if ! command -v uv >/dev/null 2>&1; then
    echo "uv could not be installed: get it from https://docs.astral.sh/uv/getting-started/installation/ and run this again" >&2
    exit 2
  fi
}
