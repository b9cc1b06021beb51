SELECT EXISTS (
    SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
    WHERE p.pubname = %(publication)s AND pr.prrelid = %(table)s::regclass)
