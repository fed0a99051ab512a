-- Runs once, when the postgres container initialises an empty data volume
-- (`docker compose down -v` to run it again).
--
-- One database per service, each owned by its own login role: a service can
-- migrate and use its own schema and cannot touch another service's data.
-- Passwords are development-only; compose passes them in each DATABASE_URL.

CREATE ROLE ordermesh_order LOGIN PASSWORD 'ordermesh_order';
CREATE DATABASE ordermesh_order OWNER ordermesh_order;

CREATE ROLE ordermesh_inventory LOGIN PASSWORD 'ordermesh_inventory';
CREATE DATABASE ordermesh_inventory OWNER ordermesh_inventory;

CREATE ROLE ordermesh_payment LOGIN PASSWORD 'ordermesh_payment';
CREATE DATABASE ordermesh_payment OWNER ordermesh_payment;

CREATE ROLE ordermesh_shipping LOGIN PASSWORD 'ordermesh_shipping';
CREATE DATABASE ordermesh_shipping OWNER ordermesh_shipping;

-- Nobody but the owner connects to a service's database.
REVOKE CONNECT ON DATABASE ordermesh_order FROM PUBLIC;
REVOKE CONNECT ON DATABASE ordermesh_inventory FROM PUBLIC;
REVOKE CONNECT ON DATABASE ordermesh_payment FROM PUBLIC;
REVOKE CONNECT ON DATABASE ordermesh_shipping FROM PUBLIC;
