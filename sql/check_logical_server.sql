-- What logical capture needs of the server and of the listener's role.
SELECT current_setting('wal_level') AS wal_level,
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) AS can_replicate,
       current_user,
       EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s) AS publication_exists,
       current_setting('max_slot_wal_keep_size') AS max_slot_wal_keep_size
