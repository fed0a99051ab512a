-- The order in which the consumer applied the events. Rows applied in one batch share
-- received_at (their transaction's time), so received_at cannot tell their order; this
-- sequence can (a batch inserts its rows in arrival order). The auditor checks each
-- aggregate's events against it.
-- Added without a volatile default and then given one: no rewrite of an existing (possibly
-- large) table under an exclusive lock. Rows from before have NULL (one transaction each
-- then, so received_at orders them).
CREATE SEQUENCE order_timeline_applied_order_seq;
ALTER TABLE order_timeline ADD COLUMN applied_order bigint;
ALTER TABLE order_timeline
    ALTER COLUMN applied_order SET DEFAULT nextval('order_timeline_applied_order_seq');
ALTER SEQUENCE order_timeline_applied_order_seq OWNED BY order_timeline.applied_order;
