-- Demo destinations (listed in the README); the unsupported ones exercise compensation.
INSERT INTO destinations (code, name, supported) VALUES
    ('DE', 'Germany', true),
    ('FR', 'France', true),
    ('NL', 'Netherlands', true),
    ('GB', 'United Kingdom', true),
    ('US', 'United States', true),
    ('CA', 'Canada', true),
    ('JP', 'Japan', true),
    ('AQ', 'Antarctica', false),
    ('BV', 'Bouvet Island', false),
    ('HM', 'Heard Island and McDonald Islands', false);
