-- Whether the logical mode's objects are installed here: our slot bookkeeping and the
-- publication the listener streams.
SELECT to_regclass('cdc_invalidator.slot_state_v1') IS NOT NULL
       AND EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s) AS installed
