-- `cdc-invalidator keys TABLE --where SQL`: the template columns of the rows the
-- operator's condition selects, as text (what the listener renders keys from). Run in
-- a READ ONLY transaction with a statement_timeout, as one statement of the extended
-- protocol (the limit is a parameter), so the condition cannot end the transaction or
-- add a statement. {columns}, {table}, {where} are composed by tools/keys.py.
SELECT {columns}
FROM {table}
WHERE ({where})
LIMIT %(limit)s
