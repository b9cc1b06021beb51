-- Whether the server is a standby (in recovery): it takes no writes. Run before the
-- session pins its search_path (pg/connect.py): under the role's own, which may name a
-- schema before pg_catalog, so pg_catalog is named here.
SELECT pg_catalog.pg_is_in_recovery()
