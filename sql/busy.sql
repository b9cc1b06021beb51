-- The listener is busy (it reads the queue on its own, without waiting for wake-ups):
-- while it holds this lock, capture functions send none, so that their commits are not
-- serialized behind one another's (schema.sql's wake_up_v1() says why and how). A try:
-- a writer testing the lock holds it shared for an instant; the next batch tries again.
SELECT pg_try_advisory_lock(hashtext('cdc_invalidator.queue_v1'), 1)
