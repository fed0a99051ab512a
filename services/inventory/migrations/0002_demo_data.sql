-- Demo catalogue (listed in the README): plenty, scarce and sold-out items.
INSERT INTO products (sku, name, price, available, stocked) VALUES
    ('KB-101', 'Mechanical keyboard', 89.00, 500, 500),
    ('MS-202', 'Wireless mouse', 25.50, 2000, 2000),
    ('MN-303', '27-inch monitor', 249.00, 30, 30),
    ('CB-404', 'USB-C cable', 9.99, 10000, 10000),
    ('HP-505', 'Noise-cancelling headphones', 179.00, 5, 5),
    ('LS-606', 'Laptop stand', 39.00, 0, 0);
