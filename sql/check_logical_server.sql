-- What logical capture needs of the server and of the listener's role.
SELECT current_setting('wal_level') AS wal_level,
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
           -- Amazon RDS and Aurora grant replication by membership in rds_replication.
           OR EXISTS (SELECT FROM pg_roles r WHERE r.rolname = 'rds_replication'
                      AND pg_has_role(current_user, r.oid, 'MEMBER')) AS can_replicate,
       current_user,
       EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s) AS publication_exists,
       current_setting('max_slot_wal_keep_size') AS max_slot_wal_keep_size,
       current_setting('synchronous_standby_names') AS synchronous_standby_names,
       current_setting('max_wal_senders')::int AS max_wal_senders
