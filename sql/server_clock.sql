-- The server's clock, in Unix time: commit times in the stream are the server's.
SELECT extract(epoch FROM clock_timestamp())::float8 AS now
