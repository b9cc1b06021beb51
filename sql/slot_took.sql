-- On a clean stop, after the last standby status update: whether the walsender has read
-- it (the slot's confirmed position is at least where it said). The stream is closed
-- only then, or after a while: closed with data unread, the connection is reset, and a
-- walsender blocked sending the rest exits without reading what it was sent.
SELECT coalesce(bool_and(confirmed_flush_lsn >= %(lsn)s::pg_lsn), true)
FROM pg_replication_slots
WHERE slot_name = %(slot)s
