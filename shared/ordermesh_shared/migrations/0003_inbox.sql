-- Events a consumer has applied, written in the same transaction as the event's effect:
-- a redelivered message finds its id here and is acknowledged without being applied again.
-- Keyed by consumer too, so two consumers in one service each apply the same event once.
CREATE TABLE inbox (
    consumer    text NOT NULL,
    message_id  text NOT NULL,
    event_type  text NOT NULL,
    source      text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX inbox_received_at ON inbox (received_at);
