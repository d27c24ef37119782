#!/usr/bin/env bash
# Install nbdcache into a local venv (once) and serve the embedded default:
# one export on 127.0.0.1:10809.  Extra arguments go to `nbdcache serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/nbdcache ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/nbdcache serve "$@"
