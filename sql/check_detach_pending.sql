-- Partitions of watched tables (members_v1) whose DETACH ... CONCURRENTLY stopped after
-- its first transaction: no longer read through the table, swept only at FINALIZE.
-- (PostgreSQL 14 and later; only where the rebuild guard, and so members_v1, is.)
SELECT format('%I.%I', pn.nspname, p.relname) AS part,
       format('%I.%I', an.nspname, a.relname) AS parent,
       format('%I.%I', rn.nspname, r.relname) AS root
FROM pg_inherits i
JOIN cdc_invalidator.members_v1 m ON m.part = i.inhrelid
JOIN pg_class p ON p.oid = m.part JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN pg_class a ON a.oid = i.inhparent JOIN pg_namespace an ON an.oid = a.relnamespace
JOIN pg_class r ON r.oid = m.root JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE i.inhdetachpending
ORDER BY 1, 2
