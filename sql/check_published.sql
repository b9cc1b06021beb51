-- Whether the table is in the publication, and the key columns its column list (if it
-- has one) leaves out.
SELECT pr.prrelid IS NOT NULL,
       ARRAY(SELECT k FROM unnest(%(columns)s::text[]) k
             WHERE pr.prattrs IS NOT NULL
               AND NOT EXISTS (SELECT FROM pg_attribute a
                               WHERE a.attrelid = pr.prrelid AND a.attname = k
                                 AND a.attnum = ANY (pr.prattrs)))
FROM (SELECT) one
LEFT JOIN (pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                                   AND p.pubname = %(publication)s)
       ON pr.prrelid = %(table)s::regclass
