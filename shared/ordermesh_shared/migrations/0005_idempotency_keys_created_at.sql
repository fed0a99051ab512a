-- The retention pruner deletes keys oldest first (see retention.py): without this index each
-- of its batches would scan the whole table.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
