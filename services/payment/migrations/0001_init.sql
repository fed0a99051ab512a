CREATE TABLE customers (
    id       text PRIMARY KEY,
    name     text NOT NULL,
    -- The CHECK makes an overdraft impossible even if two charges race.
    balance  numeric(12, 2) NOT NULL CHECK (balance >= 0)
);

CREATE TABLE payments (
    id           uuid PRIMARY KEY,
    order_id     uuid NOT NULL,
    customer_id  text NOT NULL REFERENCES customers (id),
    amount       numeric(12, 2) NOT NULL CHECK (amount > 0),
    status       text NOT NULL CHECK (status IN ('charged', 'refunded', 'declined')),
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_order_id ON payments (order_id);
CREATE INDEX payments_customer_id ON payments (customer_id);
