-- Demo customers (listed in the README); dave cannot afford much.
INSERT INTO customers (id, name, balance) VALUES
    ('alice', 'Alice Martin', 1000000.00),
    ('bob', 'Bob Chen', 50000.00),
    ('carol', 'Carol Okafor', 500.00),
    ('dave', 'Dave Smith', 20.00);
