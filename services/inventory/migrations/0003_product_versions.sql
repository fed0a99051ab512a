-- Each change to what a catalogue shows of a product (its price, the units available) bumps
-- its version, in the statement that makes the change and writes the product_changed event
-- (inventory/store.py). A replica keeps, per SKU, the highest version it has seen: an older
-- event (redelivered, or from before the snapshot it started from) never overwrites a newer
-- fact. The demo products start at 1; GET /catalogue/snapshot serves them with it.
ALTER TABLE products ADD COLUMN version bigint NOT NULL DEFAULT 1;
