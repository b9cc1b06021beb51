-- Slots recorded as ours (slot_state_v1) whose changes may be in no slot now: gone
-- (dropped by hand, as install and check advise for a slot they leave; or never made: an
-- install by a role without REPLICATION, or the SQL applied by hand, before a switch to
-- trigger mode), or owing a sweep (resync_reason). `install` sweeps every watched table
-- once for them, then forgets the gone ones. Not the slot named %(keep)s (logical mode's
-- configured slot: the listener acts on its own state).
SELECT st.slot_name::text,
       EXISTS (SELECT FROM pg_replication_slots s WHERE s.slot_name = st.slot_name) AS present
FROM cdc_invalidator.slot_state_v1 st
WHERE st.slot_name IS DISTINCT FROM %(keep)s
  AND (st.resync_reason IS NOT NULL
       OR NOT EXISTS (SELECT FROM pg_replication_slots s WHERE s.slot_name = st.slot_name))
ORDER BY 1
