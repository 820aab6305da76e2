#!/usr/bin/env bash
# The demo: installs what is missing, starts the whole stack (left running), runs the load demo.
#   ./demo.sh [args for loadtest.demo]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash deploy/bootstrap.sh
.venv/bin/python -m deploy.stack start

if [ ! -f loadtest/demo.py ] && [ ! -f loadtest/demo/__main__.py ]; then
    echo "demo.sh: loadtest/demo.py does not exist yet: the stack is up, nothing to demo" >&2
    echo "demo.sh: see '.venv/bin/python -m deploy.stack status'; stop with '.venv/bin/python -m deploy.stack stop'" >&2
    exit 0
fi
exec .venv/bin/python -m loadtest.demo "$@"
