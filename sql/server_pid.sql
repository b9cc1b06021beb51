-- The server process of this session: the cancel key PostgreSQL sent at startup names
-- the same one; a connection pooler's names one of its own (pg/connect.py).
SELECT pg_catalog.pg_backend_pid()
