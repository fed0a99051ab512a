-- Stock is split into three buckets so conservation is checkable at any moment:
-- available + reserved + committed never changes except through restocking.
CREATE TABLE products (
    sku        text PRIMARY KEY,
    name       text NOT NULL,
    price      numeric(12, 2) NOT NULL CHECK (price >= 0),
    available  integer NOT NULL CHECK (available >= 0),
    reserved   integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    committed  integer NOT NULL DEFAULT 0 CHECK (committed >= 0),
    -- Units ever stocked: the database itself refuses any write that loses or makes a unit.
    stocked    integer NOT NULL,
    CONSTRAINT stock_conserved CHECK (available + reserved + committed = stocked)
);

CREATE TABLE reservations (
    id          uuid PRIMARY KEY,
    -- One reservation per order: a release that arrives before its reserve leaves a
    -- 'released' row behind, so the late reserve is refused instead of leaking stock.
    order_id    uuid NOT NULL UNIQUE,
    status      text NOT NULL CHECK (status IN ('reserved', 'released', 'committed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservation_items (
    reservation_id  uuid NOT NULL REFERENCES reservations (id),
    sku             text NOT NULL REFERENCES products (sku),
    quantity        integer NOT NULL CHECK (quantity > 0),
    unit_price      numeric(12, 2) NOT NULL,
    PRIMARY KEY (reservation_id, sku)
);
