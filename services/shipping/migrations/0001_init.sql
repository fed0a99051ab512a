CREATE TABLE destinations (
    code       char(2) PRIMARY KEY CHECK (code ~ '^[A-Z]{2}$'),  -- ISO 3166-1 alpha-2
    name       text NOT NULL,
    supported  boolean NOT NULL
);

CREATE TABLE shipments (
    id           uuid PRIMARY KEY,
    -- One shipment per order; a cancel before the create leaves a 'cancelled' row
    -- (destination unknown) so the late create is refused.
    order_id     uuid NOT NULL UNIQUE,
    destination  char(2) REFERENCES destinations (code),
    status       text NOT NULL CHECK (status IN ('created', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
