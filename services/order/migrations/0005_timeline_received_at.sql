-- The retention pruner deletes timeline rows oldest first (ordermesh_shared/retention.py):
-- without this index each of its batches would scan the whole table.
CREATE INDEX order_timeline_received_at ON order_timeline (received_at);
