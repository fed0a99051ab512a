-- The transactional outbox: events written in the business transaction, relayed to RabbitMQ.
-- id orders the relay's claims (per aggregate it is commit order, because writers of one
-- aggregate hold its row lock); event_id is the CloudEvents id and the AMQP message_id.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE,
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',   -- CloudEvents extensions, e.g. traceparent
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,    -- publish attempts, successful or not
    last_error      text,
    next_attempt_at timestamptz,                   -- NULL: due now; set by a failed attempt
    published_at    timestamptz,                   -- set only after the broker confirmed
    quarantined_at  timestamptz                    -- set after too many failures; re-drivable
);

-- The relay's claim: unpublished, unquarantined rows in id order.
CREATE INDEX outbox_claimable ON outbox (id)
    WHERE published_at IS NULL AND quarantined_at IS NULL;

-- "Does an earlier event of this aggregate still wait?" (per-aggregate order).
CREATE INDEX outbox_aggregate_unpublished ON outbox (aggregate_type, aggregate_id, id)
    WHERE published_at IS NULL;

CREATE INDEX outbox_quarantined ON outbox (id) WHERE quarantined_at IS NOT NULL;

-- Pruning published rows.
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
