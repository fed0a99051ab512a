-- A saga row per orchestration and a step log: written before and after every step, so a
-- crash at any point leaves enough behind to resume or compensate.
CREATE TABLE sagas (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    status          text NOT NULL CHECK (status IN
                        ('running', 'compensating', 'completed', 'cancelled', 'compensation_failed')),
    input           jsonb NOT NULL,
    data            jsonb NOT NULL DEFAULT '{}',
    -- Steps whose action has started: their compensations are registered.
    started_steps   integer NOT NULL DEFAULT 0,
    failure_reason  text,
    -- The process running it; another may take over once lease_until has passed.
    owner           text,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sagas_unfinished ON sagas (lease_until) WHERE status IN ('running', 'compensating');

CREATE TABLE saga_steps (
    saga_id      uuid NOT NULL REFERENCES sagas (id),
    step         text NOT NULL,
    direction    text NOT NULL CHECK (direction IN ('forward', 'compensate')),
    position     integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('started', 'succeeded', 'rejected', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (saga_id, step, direction)
);
