-- Trigger mode: the configured tables that a logical-replication subscription of this
-- database applies rows into: the table, one of its partitions or inheritance children
-- (at any depth), or a partitioned table it is a partition of, which routes rows into
-- it. PostgreSQL's apply worker fires row triggers only, never statement triggers (its
-- initial table copy fires both), so what it applies after the copy goes by our capture
-- triggers, and the keys of those rows stay cached. Each row: the configured table, the
-- subscription, the table the subscription names where it is another (else NULL),
-- whether it is enabled. pg_subscription_rel lists the tables of a subscription's
-- publications as last fetched (CREATE SUBSCRIPTION, ALTER SUBSCRIPTION ... REFRESH
-- PUBLICATION, or SET PUBLICATION with its default refresh). Run by `check`,
-- and by trigger mode's install script inside refuse_subscribed.sql, with the configured
-- tables' qualified names as a text[]. (subname, subenabled and subdbid are readable by
-- every role; subconninfo, which may hold a password, is not read. No alias is `r`: the
-- install script's loop variable is.)
WITH RECURSIVE configured (rel, name) AS (
    SELECT to_regclass(t)::oid, t FROM unnest({tables}) t
    WHERE to_regclass(t) IS NOT NULL
), below (rel, name, configured) AS (
    SELECT c.rel, c.name, c.rel FROM configured c
    UNION
    SELECT i.inhrelid, b.name, b.configured FROM below b JOIN pg_inherits i ON i.inhparent = b.rel
), family (rel, name, configured) AS (
    SELECT b.rel, b.name, b.configured FROM below b
    UNION
    SELECT a.relid, c.name, c.rel
    FROM configured c CROSS JOIN LATERAL pg_partition_ancestors(c.rel) a
)
SELECT f.name AS table_name, s.subname::text AS subscription,
       CASE WHEN sr.srrelid <> f.configured THEN format('%I.%I', n.nspname, c.relname) END
           AS target,
       s.subenabled AS enabled
FROM pg_subscription_rel sr
JOIN pg_subscription s ON s.oid = sr.srsubid
JOIN family f ON f.rel = sr.srrelid
JOIN pg_class c ON c.oid = sr.srrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE s.subdbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
ORDER BY 1, 2, 3
