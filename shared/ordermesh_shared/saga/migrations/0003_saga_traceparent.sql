-- The W3C trace context the saga was started in (the POST /orders request's span), written
-- with its first step: a saga resumed elsewhere after a crash continues that trace.
ALTER TABLE sagas ADD COLUMN traceparent text;
