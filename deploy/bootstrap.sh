#!/usr/bin/env bash
# Installs what the local stack needs. Idempotent; a second run only checks stamps.
#   - .venv (python3 -m venv) and `pip install -e '.[dev]'` when pyproject.toml changed
#   - PostgreSQL server (Debian package `postgresql`) when no server binary exists
#   - Java 17 + Maven (Debian packages) when missing
#   - Apache Kafka jars from Maven Central into $STATE/kafka/lib when deploy/kafka/pom.xml changed
#   - Kafka's tools (kafka-tools) into $STATE/kafka/tools-lib when deploy/kafka/tools-pom.xml changed
#   - Prometheus server + promtool (Debian package `prometheus`) when missing
#   - with --test-tools: headless Chromium and a CJK font (Debian), for the dashboard tests
set -euo pipefail

TEST_TOOLS=0
for arg in "$@"; do
    case "$arg" in
        --test-tools) TEST_TOOLS=1 ;;
        *) echo "usage: $0 [--test-tools]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="${XS_STATE_DIR:-$ROOT/.state}"
mkdir -p "$STATE"

log() { echo "[bootstrap] $*"; }

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# --- Python virtualenv ---------------------------------------------------------
force_pip=0
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $(command -v python3) ($(python3 --version 2>&1))"
    python3 -m venv .venv
    force_pip=1
fi

pip_stamp="$STATE/pip-install.stamp"
pip_hash="$( (sha256sum pyproject.toml; .venv/bin/python --version 2>&1) | sha256sum | cut -d' ' -f1)"
if [ "$force_pip" = 0 ] && [ "$(cat "$pip_stamp" 2>/dev/null || true)" = "$pip_hash" ] \
    && .venv/bin/python -c 'import importlib.metadata as m; m.version("xsettle")' 2>/dev/null; then
    log "python deps up to date (pyproject.toml unchanged)"
else
    log "pip install -e '.[dev]' (pyproject.toml changed or first install)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$pip_hash" > "$pip_stamp"
fi

# --- PostgreSQL server -----------------------------------------------------------
if compgen -G '/usr/lib/postgresql/*/bin/postgres' > /dev/null; then
    log "postgresql server present: $(ls -d /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)"
else
    apt_install postgresql
fi

# --- Java + Maven ------------------------------------------------------------------
if ! command -v java > /dev/null; then
    apt_install openjdk-17-jre-headless
fi
if ! command -v mvn > /dev/null; then
    apt_install maven
fi

# --- Kafka jars from Maven Central ------------------------------------------------
kafka_lib="$STATE/kafka/lib"
kafka_stamp="$STATE/kafka/lib.stamp"
kafka_hash="$(sha256sum deploy/kafka/pom.xml | cut -d' ' -f1)"
if [ -d "$kafka_lib" ] && [ "$(cat "$kafka_stamp" 2>/dev/null || true)" = "$kafka_hash" ] \
    && compgen -G "$kafka_lib/kafka_2.13-*.jar" > /dev/null; then
    log "kafka jars up to date ($(basename "$(ls "$kafka_lib"/kafka_2.13-*.jar)"))"
else
    log "resolving kafka jars from Maven Central into $kafka_lib (first time may take minutes)"
    mkdir -p "$STATE/kafka"
    rm -rf "$kafka_lib.tmp"
    # (Debian's maven prints bare colour resets even with -q -B: strip them.)
    mvn -q -B -Dstyle.color=never -f deploy/kafka/pom.xml dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$kafka_lib.tmp" 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g'
    rm -rf "$kafka_lib"
    mv "$kafka_lib.tmp" "$kafka_lib"
    echo "$kafka_hash" > "$kafka_stamp"
    log "kafka jars: $(ls "$kafka_lib" | wc -l) files ($(basename "$(ls "$kafka_lib"/kafka_2.13-*.jar)"))"
fi

# --- Kafka's command-line tools (consumer-group offsets, quorum status) ----------------
# kafka-tools has a heavier dependency tree than the broker: its own lib folder, same scheme.
tools_lib="$STATE/kafka/tools-lib"
tools_stamp="$STATE/kafka/tools-lib.stamp"
tools_hash="$(sha256sum deploy/kafka/tools-pom.xml | cut -d' ' -f1)"
if [ -d "$tools_lib" ] && [ "$(cat "$tools_stamp" 2>/dev/null || true)" = "$tools_hash" ] \
    && compgen -G "$tools_lib/kafka-tools-*.jar" > /dev/null; then
    log "kafka tools up to date ($(basename "$(ls "$tools_lib"/kafka-tools-[0-9]*.jar)"))"
else
    log "resolving kafka-tools from Maven Central into $tools_lib"
    rm -rf "$tools_lib.tmp"
    mvn -q -B -Dstyle.color=never -f deploy/kafka/tools-pom.xml dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tools_lib.tmp" 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g'
    rm -rf "$tools_lib"
    mv "$tools_lib.tmp" "$tools_lib"
    echo "$tools_hash" > "$tools_stamp"
    log "kafka tools: $(ls "$tools_lib" | wc -l) files"
fi

# --- Prometheus server + promtool ------------------------------------------------------
# The local stack runs its own server (deploy/stack.py); the package's own daemon must not
# start during installation (it would take port 9090), hence a temporary policy-rc.d.
if command -v prometheus > /dev/null && command -v promtool > /dev/null; then
    log "prometheus present: $(prometheus --version 2>&1 | head -1)"
else
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    apt_install prometheus
    if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
fi

# --- Test tools: headless Chromium + a CJK font -------------------------------------------
if [ "$TEST_TOOLS" = 1 ]; then
    missing=()
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk" || missing+=(fonts-wqy-microhei)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    else
        log "chromium present: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
    fi
fi

log "done"
