#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL + Kafka (left running), runs pytest.
#   ./test.sh                      # all tests, -q
#   ./test.sh tests/unit -x        # any pytest arguments
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash deploy/bootstrap.sh --test-tools
.venv/bin/python -m deploy.stack start --infra-only

if [ "$#" -eq 0 ]; then
    set -- -q
fi
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
