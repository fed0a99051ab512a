-- The retention pruner deletes the steps of finished sagas oldest first
-- (ordermesh_shared/retention.py). started_at never changes after the insert, so the index
-- leaves the step updates HOT.
CREATE INDEX saga_steps_started_at ON saga_steps (started_at);
