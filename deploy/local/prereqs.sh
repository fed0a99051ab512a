#!/usr/bin/env bash
# What `make dev` and `make test` need on this machine, installed and started when missing:
#   uv (pinned), PostgreSQL, RabbitMQ and etcd (Debian packages), both servers running, and a
#   PostgreSQL login for the local stack with its password in .run/local.env.
# As root on Debian it installs and starts what is missing; otherwise it names the first thing
# missing and the command that fixes it in one line, and exits 1. With everything in place it
# only checks (no network, well under a second).
#
# Usage: deploy/local/prereqs.sh        everything
#        deploy/local/prereqs.sh uv     only make sure uv is there (make install)
set -euo pipefail
cd "$(dirname "$0")/../.."

UV_VERSION=0.13.9 # the same as deploy/Dockerfile's
PG_PORT=5432
PG_ROLE=ordermesh
RABBITMQ_PORT=5672
ENV_FILE=.run/local.env
START_WAIT=60 # seconds a server may take to come up

# The servers' tools (rabbitmq-server, rabbitmqctl) live in /usr/sbin, which a non-root PATH lacks.
PATH="$PATH:/usr/sbin:/sbin"

fail() {
    echo "prereqs: $*" >&2
    exit 1
}

is_root() { [[ $EUID -eq 0 ]]; }

# $1 what is wrong, $2 the command that fixes it as root: done here when we are root, else named.
need_root() {
    is_root || fail "$1: run as root: $2"
}

wait_until() {
    local seconds=$1
    shift
    for _ in $(seq "$((seconds * 5))"); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}

# --- Debian packages -------------------------------------------------------------------------

missing_packages() {
    command -v etcd >/dev/null || echo etcd-server
    command -v pg_ctlcluster >/dev/null || echo postgresql
    command -v rabbitmq-server >/dev/null || echo rabbitmq-server
    [[ $FOR_TESTS == yes ]] || return 0
    # Only the tests need these (a browser is ~100 MB the platform itself never uses):
    # headless, for the overview page's browser test (tests/integration/test_overview_page.py).
    command -v chromium >/dev/null || echo chromium
    # promtool checks the observability configs; the local scrape test runs the server.
    command -v promtool >/dev/null || echo prometheus
}

install_packages() {
    local packages
    mapfile -t packages < <(missing_packages)
    ((${#packages[@]})) || return 0
    local command="apt-get install -y ${packages[*]}"
    if ! command -v apt-get >/dev/null || [[ ! -r /etc/debian_version ]]; then
        fail "missing ${packages[*]}: install them with this system's package manager" \
            "(on Debian, as root: $command)"
    fi
    need_root "missing ${packages[*]}" "$command (or: make deps)"
    echo "prereqs: installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null || fail "$command failed (output above)"
}

# --- uv --------------------------------------------------------------------------------------

# pip --target, not a plain `pip install`: Debian's own Python refuses that (PEP 668), and
# --prefix lands in <prefix>/local/bin there. The link goes where PATH already looks.
install_uv() {
    command -v uv >/dev/null && return 0
    local home=/usr/local
    is_root || home=$HOME/.local
    local dir=$home/lib/uv-$UV_VERSION
    echo "prereqs: installing uv $UV_VERSION into $dir (linked from $home/bin)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$dir" "uv==$UV_VERSION" ||
        fail "uv is missing and pip could not install it: see https://docs.astral.sh/uv/"
    mkdir -p "$home/bin"
    ln -sf "$dir/bin/uv" "$dir/bin/uvx" "$home/bin/"
    hash -r
    command -v uv >/dev/null || fail "uv is in $home/bin, which is not on PATH: add it to PATH"
}

# --- PostgreSQL ------------------------------------------------------------------------------

pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
    pg_up && return 0
    local version cluster
    read -r version cluster < <(pg_lsclusters --no-header | awk -v port="$PG_PORT" \
        '$3 == port { print $1, $2; exit }') || true
    if [[ -z ${version:-} ]]; then
        version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -1)
        cluster=main
        need_root "no PostgreSQL cluster on port $PG_PORT" "pg_createcluster -p $PG_PORT $version main"
        pg_createcluster -p "$PG_PORT" "$version" main >/dev/null
    fi
    # No systemd on these machines: start the cluster directly.
    local start=(pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start)
    need_root "PostgreSQL is not running" "${start[*]}"
    echo "prereqs: starting PostgreSQL $version/$cluster"
    local log=/var/log/postgresql/postgresql-$version-$cluster.log
    "${start[@]}" || fail "PostgreSQL $version/$cluster did not start: see $log"
    wait_until "$START_WAIT" pg_up || fail "PostgreSQL not ready after ${START_WAIT} s: see $log"
}

# Debian's default of 100 connections is used up by one test run beside a running stack and a
# benchmark (four services x pools, relays, consumers). 300 costs a few MB of shared memory.
PG_MAX_CONNECTIONS=300

ensure_pg_connections() {
    local now
    now=$(cd / && runuser -u postgres -- psql -qAt -d postgres -c 'SHOW max_connections' 2>/dev/null) || return 0
    ((now >= PG_MAX_CONNECTIONS)) && return 0
    need_root "PostgreSQL allows only $now connections" "deploy/local/prereqs.sh"
    echo "prereqs: raising PostgreSQL max_connections from $now to $PG_MAX_CONNECTIONS (restart)"
    (cd / && runuser -u postgres -- psql -q -d postgres \
        -c "ALTER SYSTEM SET max_connections = $PG_MAX_CONNECTIONS") >/dev/null
    local version cluster
    read -r version cluster < <(pg_lsclusters --no-header | awk -v port="$PG_PORT" \
        '$3 == port { print $1, $2; exit }')
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" restart
    wait_until "$START_WAIT" pg_up || fail "PostgreSQL not ready after its restart"
}

env_value() { sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null; }

# The password is the one in POSTGRES_URL=postgresql://ordermesh:<password>@...
pg_login_works() {
    local password
    password=$(env_value POSTGRES_URL | sed -n 's|^[a-z]*://[^:]*:\([^@]*\)@.*|\1|p')
    [[ -n $password ]] || return 1
    PGPASSWORD=$password PGCONNECT_TIMEOUT=3 psql -w -qAt -h 127.0.0.1 -p "$PG_PORT" \
        -U "$PG_ROLE" -d postgres -c 'SELECT 1' >/dev/null 2>&1
}

# Debian's pg_hba asks for a password on 127.0.0.1 (scram) and trusts the socket's peer, so:
# a role of our own with a password, set over the socket as the postgres user. CREATEDB is all
# the stack and the tests need (no migration creates an extension): not a superuser.
# Every checkout on this machine logs in as the one role, so with one password: kept in the
# user's config too, a second clone (or CI's) takes it instead of resetting the role's
# password, which would lock the first clone out.
SHARED_ENV_FILE=${XDG_CONFIG_HOME:-$HOME/.config}/ordermesh/local.env

ensure_pg_role() {
    pg_login_works && { share_env_file; return 0; }
    if [[ -r $SHARED_ENV_FILE ]]; then
        mkdir -p .run
        chmod 700 .run
        (umask 077 && cp "$SHARED_ENV_FILE" "$ENV_FILE")
        pg_login_works && { echo "prereqs: PostgreSQL login taken from $SHARED_ENV_FILE"; return 0; }
    fi
    need_root "no working PostgreSQL login in $ENV_FILE" "deploy/local/prereqs.sh (or: make deps)"
    local password
    password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
    # Through stdin, not argv: the password never shows in ps. Reset when the role exists
    # (its password was in a file that is gone).
    (cd / && runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres) <<SQL >/dev/null
SELECT 'CREATE ROLE $PG_ROLE' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE')
\\gexec
ALTER ROLE $PG_ROLE WITH LOGIN CREATEDB NOSUPERUSER NOCREATEROLE PASSWORD '$password';
SQL
    write_env_file "$password"
    pg_login_works || fail "the new role $PG_ROLE cannot log in on 127.0.0.1:$PG_PORT: check pg_hba.conf"
    share_env_file
    echo "prereqs: PostgreSQL role $PG_ROLE ready; its password is in $ENV_FILE"
}

share_env_file() {
    cmp -s "$ENV_FILE" "$SHARED_ENV_FILE" 2>/dev/null && return 0
    mkdir -p "$(dirname "$SHARED_ENV_FILE")"
    (umask 077 && cp "$ENV_FILE" "$SHARED_ENV_FILE.tmp" && mv "$SHARED_ENV_FILE.tmp" "$SHARED_ENV_FILE")
}

write_env_file() {
    local server="postgresql://$PG_ROLE:$1@127.0.0.1:$PG_PORT"
    # .run/ also holds stack.json and supervisord.conf, which carry the same password.
    mkdir -p .run
    chmod 700 .run
    (
        umask 077
        cat >"$ENV_FILE.tmp" <<EOF
# Written by deploy/local/prereqs.sh; make passes these on. Delete the file for a new password.
POSTGRES_URL=$server
ORDERMESH_TEST_PG=$server/postgres
EOF
    )
    mv "$ENV_FILE.tmp" "$ENV_FILE"
}

# --- RabbitMQ --------------------------------------------------------------------------------

# The broker's own guest/guest account: RabbitMQ lets guest in from loopback only, and the
# local stack and the tests connect over 127.0.0.1, so no user of our own is needed here.
rabbitmq_up() { timeout 2 bash -c ": </dev/tcp/127.0.0.1/$RABBITMQ_PORT" 2>/dev/null; }

start_rabbitmq() {
    rabbitmq_up && return 0
    need_root "RabbitMQ is not running" "rabbitmq-server -detached"
    echo "prereqs: starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    # The AMQP listener opens at the end of the broker's boot.
    wait_until "$START_WAIT" rabbitmq_up ||
        fail "RabbitMQ not listening on $RABBITMQ_PORT after ${START_WAIT} s: see /var/log/rabbitmq/"
}

FOR_TESTS=no

main() {
    if [[ ${1:-} == uv ]]; then
        install_uv
        return
    fi
    # "tests": also what only the test suite uses (make test and .ci/run ask for it).
    [[ ${1:-} == tests ]] && FOR_TESTS=yes
    install_packages
    install_uv
    start_postgres
    ensure_pg_connections
    ensure_pg_role
    start_rabbitmq
}

main "$@"
