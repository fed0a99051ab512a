-- The catalogue replica (order/catalogue.py): inventory's product facts as its
-- product_changed events and its snapshot tell them, eventually consistent. Each row keeps
-- inventory's version of the product; an event or snapshot row applies only when its version
-- is higher, so an old event redelivered, or one from before the snapshot, changes nothing.
CREATE SEQUENCE catalogue_applied_seq;
CREATE TABLE catalogue_products (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    price       numeric(12, 2) NOT NULL,
    available   integer NOT NULL,               -- a hint: inventory decides at reservation
    version     bigint NOT NULL,                -- inventory's products.version
    changed_at  timestamptz,                    -- the event's time at inventory (NULL: snapshot)
    -- Grows with every write here: an instance's in-memory copy reads what changed since.
    applied_seq bigint NOT NULL DEFAULT nextval('catalogue_applied_seq'),
    applied_at  timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE catalogue_applied_seq OWNED BY catalogue_products.applied_seq;
CREATE INDEX catalogue_products_applied ON catalogue_products (applied_seq);

-- One row: how fresh the replica is.
CREATE TABLE catalogue_state (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    snapshot_at   timestamptz,  -- inventory's time of the last snapshot applied; NULL: cold
    last_event_at timestamptz   -- inventory's time of the newest event applied
);
INSERT INTO catalogue_state DEFAULT VALUES;

-- The unit price the replica quoted when the order was placed (NULL: the replica did not
-- know the product then); unit_price stays the price inventory took.
ALTER TABLE order_items ADD COLUMN quoted_price numeric(12, 2);
