-- A participant command writes its effect, event and answer in one statement, checking that
-- the aggregate is still as it was loaded; when it is not, the statement calls this to fail
-- as a whole with SQLSTATE 40001 (as a serialization failure would), and the command runs
-- again from its load (shared/ordermesh_shared/commands.py).
CREATE FUNCTION command_raced() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the aggregate changed since the command loaded it'
        USING ERRCODE = 'serialization_failure';
END
$$;
