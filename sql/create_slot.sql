-- A logical slot cannot be created in a transaction that has written: run on its own.
SELECT lsn::text FROM pg_create_logical_replication_slot(%(slot)s, 'pgoutput')
