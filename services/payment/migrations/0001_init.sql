CREATE TABLE customers (
    id       text PRIMARY KEY,
    name     text NOT NULL,
    -- The CHECK makes an overdraft impossible even if two charges race.
    balance  numeric(12, 2) NOT NULL CHECK (balance >= 0)
);

CREATE TABLE payments (
    id           uuid PRIMARY KEY,
    -- One payment per order: a refund that arrives before its charge leaves a 'voided'
    -- row behind, so the late charge is refused instead of sticking.
    order_id     uuid NOT NULL UNIQUE,
    customer_id  text REFERENCES customers (id),
    amount       numeric(12, 2) NOT NULL CHECK (amount >= 0),
    status       text NOT NULL CHECK (status IN ('charged', 'refunded', 'declined', 'voided')),
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_customer_id ON payments (customer_id);
