-- GET /orders pages newest first by (created_at, id). Without an index in that order every
-- page read and sorted the whole table (~100 ms at 200,000 orders); with these, a page is
-- a backward index scan with the cursor as its index condition, filtered or not.
DROP INDEX orders_status;
DROP INDEX orders_customer_created;
CREATE INDEX orders_created ON orders (created_at, id);
CREATE INDEX orders_status_created ON orders (status, created_at, id);
CREATE INDEX orders_customer_created ON orders (customer_id, created_at, id);
