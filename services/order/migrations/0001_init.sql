CREATE TABLE orders (
    id               uuid PRIMARY KEY,
    customer_id      text NOT NULL,
    destination      char(2) NOT NULL,
    status           text NOT NULL
                     CHECK (status IN ('pending', 'completed', 'cancelled', 'compensation_failed')),
    total            numeric(12, 2),
    failure_reason   text,
    -- The same key must give the same order; the hash detects a reused key with another body.
    idempotency_key  text UNIQUE,
    request_hash     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_status ON orders (status);
CREATE INDEX orders_customer_created ON orders (customer_id, created_at DESC);

CREATE TABLE order_items (
    order_id    uuid NOT NULL REFERENCES orders (id),
    sku         text NOT NULL,
    quantity    integer NOT NULL CHECK (quantity > 0),
    unit_price  numeric(12, 2),
    PRIMARY KEY (order_id, sku)
);
