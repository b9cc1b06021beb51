-- The templates and Redis database of the last installed mapping that named a table
-- the listener's configuration does not (sql/schema.sql, retired_table_v1()).
SELECT cdc_invalidator.retired_table_v1(%(table)s)
