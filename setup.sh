#!/usr/bin/env bash
# Set up a local development environment in .venv (idempotent; a second run takes a moment).
#   bash setup.sh && .venv/bin/nlc run specs/titans.nl
set -euo pipefail
cd "$(dirname "$0")"

# Graphviz is optional: only `nlc graph -o x.svg|png` needs it; DOT text output always works.
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: installing graphviz (optional) ..."
        { apt-get install -y -qq graphviz >/dev/null 2>&1 ||
          { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1; }; } ||
            echo "setup.sh: warning: could not install graphviz; 'nlc graph' can still write .dot files" >&2
    else
        echo "setup.sh: note: graphviz 'dot' not found; 'nlc graph' can still write .dot files" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv

# Reinstall only when pyproject.toml changed (or the install is missing).
stamp=.venv/.nlc-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/nlc ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
# torch is pinned so pip takes the local CPU wheel instead of downloading a CUDA build. triton is
# pinned to the version checked with it: on a CPU machine it runs the generated kernels' tests in
# its interpreter (TRITON_INTERPRET=1); it does not depend on torch, so torch stays as it is.
.venv/bin/pip install -q torch==2.13.0 triton==3.9.0 -e '.[test,triton,explore]'
echo "$want" > "$stamp"
