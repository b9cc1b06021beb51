-- Logical mode: who streams the slot this listener found in use, its walsender's
-- backend, role and application_name (which pg_stat_activity shows every role): a
-- listener like this one has its role and application_name; anything else streaming it
-- (pg_recvlogical, a listener of another configuration) keeps every listener of ours
-- waiting, invalidating nothing, for as long as it streams.
SELECT a.pid, a.usename::text AS role, a.application_name
FROM pg_replication_slots s
JOIN pg_stat_activity a ON a.pid = s.active_pid
WHERE s.slot_name = %(slot)s
