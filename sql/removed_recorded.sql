-- removed_unrecorded.sql's recorded placeholder, where mapping_v1 is there (revision 5): whether a
-- recorded mapping holds the templates of its table r (mapping_v1.tables, revision 10,
-- read through to_jsonb: a schema of an earlier release has no such column), and, as
-- retired_table_v1(), not from before a mapping that recorded none (a downgrade's).
EXISTS (SELECT FROM cdc_invalidator.mapping_v1 m
        WHERE (to_jsonb(m) -> 'tables' ? (r.schema_name || '.' || r.table_name)
               OR to_jsonb(m) -> 'tables'
                  ? (quote_ident(r.schema_name) || '.' || quote_ident(r.table_name)))
          AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_v1 n
                          WHERE n.id > m.id
                            AND jsonb_typeof(to_jsonb(n) -> 'tables')
                                IS DISTINCT FROM 'object'))
