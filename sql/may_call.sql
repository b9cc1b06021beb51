-- Whether this session may call a function of ours (given by its signature) that
-- an install of an earlier release of the same schema revision did not make, or whose
-- EXECUTE was revoked by hand: NULL where it does not exist, false where it may not be
-- called, and its caller goes without it. (CASE: has_function_privilege() raises for a
-- function that does not exist.)
SELECT CASE WHEN to_regprocedure(%(function)s) IS NULL THEN NULL
            ELSE has_function_privilege(%(function)s, 'EXECUTE') END
