-- Whether the session's role may use replication (a refused replication connection or
-- slot is then for good, not a reason to retry).
SELECT rolreplication OR rolsuper AS can_replicate FROM pg_roles WHERE rolname = current_user
