-- The order timeline: every event an order caused, in any service, as the order service
-- consumed it from the event stream (see order/timeline.py). Written in the same transaction
-- as the consumer's inbox row, so a redelivered event adds no second entry.
CREATE TABLE order_timeline (
    event_id       text PRIMARY KEY,      -- the CloudEvents id
    order_id       uuid NOT NULL,
    service        text NOT NULL,         -- who emitted it: order, inventory, payment, shipping
    event_type     text NOT NULL,         -- e.g. stock_reserved
    aggregate_type text NOT NULL,
    sequence       bigint NOT NULL,       -- the emitter's outbox id (its commit order)
    occurred_at    timestamptz,           -- the emitter's transaction time
    received_at    timestamptz NOT NULL DEFAULT now(),
    data           jsonb NOT NULL
);

CREATE INDEX order_timeline_order ON order_timeline (order_id, occurred_at, received_at);
