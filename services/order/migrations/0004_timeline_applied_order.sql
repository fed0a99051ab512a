-- The order in which the consumer applied the events. Rows applied in one batch share
-- received_at (their transaction's time), so received_at cannot tell their order; this
-- sequence can (a batch inserts its rows in arrival order). The auditor checks each
-- aggregate's events against it.
ALTER TABLE order_timeline ADD COLUMN applied_order bigserial;

CREATE INDEX order_timeline_applied_order ON order_timeline (applied_order);
