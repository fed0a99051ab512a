-- The highest fencing token each protected resource has accepted (see coordination/fencing.py).
-- A write carrying a lower token comes from a lock holder or leader that has been replaced.
CREATE TABLE fencing_tokens (
    resource   text        PRIMARY KEY,
    token      bigint      NOT NULL CHECK (token > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
