-- Whether our slot bookkeeping is here, and this role may read it (a trigger-mode
-- listener's role is not granted it): slots it records as ours are looked at then.
SELECT CASE WHEN to_regclass('cdc_invalidator.slot_state_v1') IS NULL THEN false
            ELSE has_table_privilege(to_regclass('cdc_invalidator.slot_state_v1'), 'SELECT')
       END
