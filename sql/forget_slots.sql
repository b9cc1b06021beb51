-- After install swept for them (slots_unswept.sql): the records of slots that are gone
-- go, and what the others owed is done (the sweep covered it).
WITH gone AS (
    DELETE FROM cdc_invalidator.slot_state_v1 st
    WHERE st.slot_name = ANY (%(names)s::text[])
      AND NOT EXISTS (SELECT FROM pg_replication_slots s WHERE s.slot_name = st.slot_name)
    RETURNING st.slot_name
)
UPDATE cdc_invalidator.slot_state_v1 SET resync_reason = NULL
WHERE slot_name = ANY (%(names)s::text[]) AND resync_reason IS NOT NULL
  AND slot_name NOT IN (SELECT slot_name FROM gone)
