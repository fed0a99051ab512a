CREATE TABLE destinations (
    code       char(2) PRIMARY KEY CHECK (code ~ '^[A-Z]{2}$'),  -- ISO 3166-1 alpha-2
    name       text NOT NULL,
    supported  boolean NOT NULL
);

CREATE TABLE shipments (
    id           uuid PRIMARY KEY,
    order_id     uuid NOT NULL,
    destination  char(2) NOT NULL REFERENCES destinations (code),
    status       text NOT NULL CHECK (status IN ('created', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shipments_order_id ON shipments (order_id);
