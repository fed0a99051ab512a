#!/bin/bash
# First start: initdb with the superuser's password, run /docker-entrypoint-initdb.d/ against
# a server that listens on the socket only, then serve. Later starts: serve.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set (make up writes it to .env)}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-postgres}

initialise() {
    local pwfile
    pwfile=$(mktemp)
    printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
    # The socket trusts local users (only this container has it); TCP always needs a password.
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    rm -f "$pwfile"
    printf "host all all all scram-sha-256\n" >>"$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.auto.conf"
    pg_ctl --pgdata="$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname=postgres \
            -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    local script
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sh) echo "running $script"; bash "$script" ;;
            *.sql) echo "running $script"; psql -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname="$POSTGRES_DB" -f "$script" ;;
            *) ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" -w -m fast stop >/dev/null
}

if [ "${1:-}" = postgres ]; then
    [ -s "$PGDATA/PG_VERSION" ] || initialise
    exec postgres -D "$PGDATA" "${@:2}"
fi
exec "$@"
