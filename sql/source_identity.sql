-- Which database the listener invalidates from, for the source mark it keeps in Redis
-- (redis_guard/source.py): this server's lineage (server_lineage_v1(): system identifier
-- and timeline; NULL where the server withholds them), and the database's name and oid.
SELECT cdc_invalidator.server_lineage_v1() AS lineage,
       current_database() AS name,
       cdc_invalidator.database_oid_v1() AS oid
