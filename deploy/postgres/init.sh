#!/bin/bash
# Runs once, when the postgres container initialises an empty data volume (`make reset` or
# `docker compose down -v` to run it again). Works with the official image and with the
# offline one (deploy/images/postgres), which both run /docker-entrypoint-initdb.d/*.sh.
#
# One database per service, each owned by its own login role: a service can migrate and use
# its own schema and cannot touch another service's data. A read-only `ordermesh_audit` role
# may read every service's tables (the auditor). Passwords come from the environment
# (compose passes them from .env, which `make up` generates); there are no defaults.
set -euo pipefail

create_service_database() {  # service password
    local service=$1 password=$2
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v role="ordermesh_$service" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
-- Nobody but the owner (and the auditor, below) connects to a service's database.
REVOKE CONNECT ON DATABASE :"role" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"role" TO ordermesh_audit;
SQL
    # Tables do not exist yet (the service migrates at start): grant on what its role creates.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "ordermesh_$service" \
        -v role="ordermesh_$service" <<'SQL'
GRANT USAGE ON SCHEMA public TO ordermesh_audit;
ALTER DEFAULT PRIVILEGES FOR ROLE :"role" IN SCHEMA public GRANT SELECT ON TABLES TO ordermesh_audit;
SQL
}

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v password="${AUDIT_DB_PASSWORD:?}" <<'SQL'
CREATE ROLE ordermesh_audit LOGIN PASSWORD :'password';
SQL
create_service_database order "${ORDER_DB_PASSWORD:?}"
create_service_database inventory "${INVENTORY_DB_PASSWORD:?}"
create_service_database payment "${PAYMENT_DB_PASSWORD:?}"
create_service_database shipping "${SHIPPING_DB_PASSWORD:?}"
