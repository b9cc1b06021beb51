-- The tables installed mappings named (retired_tables_v1(), sql/schema.sql), asked once
-- may_call.sql found the function.
SELECT unnest(cdc_invalidator.retired_tables_v1())
