-- Whether the server is a standby (in recovery): it takes no writes.
SELECT pg_is_in_recovery()
