"""`cdc-invalidator demo`: the whole story on throwaway servers, in a few seconds.

Starts a PostgreSQL and a Redis of its own (servers.py), installs our SQL on a sample
`users` table, runs the real listener in a thread (stage.py), then plays an app doing
cache-aside reads and an admin changing rows in psql (actors.py, story.py), and prints
what happened with the measured time from COMMIT to the key being gone (seen through a
Redis keyspace notification, watch.py). Everything it started is stopped and removed at
the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import psycopg
import redis

from cdc_invalidator import logs
from cdc_invalidator.demo.common import DemoError, error, say
from cdc_invalidator.demo.servers import ServerError, find_pg_bindir, find_redis_server
from cdc_invalidator.demo.story import Demo
from cdc_invalidator.settings import ConfigError
from cdc_invalidator.shutdown import interrupted_by_signals

__all__ = ["run_demo"]


def run_demo(keep: bool = False, capture: str = "trigger") -> int:
    """Run the demo; 0 when everything worked, 1 otherwise (a one-line error, no traceback)."""
    # The listener's own log lines would drown the story: only its warnings, on stderr.
    logs.configure(level="warning", to="stderr")
    try:
        # Before anything is printed or created: what is missing, in one line.
        find_pg_bindir()
        find_redis_server()
    except ServerError as exc:
        error(str(exc))
        return 1
    demo = Demo(capture)
    code = 1
    with interrupted_by_signals():
        try:
            demo.run()
            code = 0
        except KeyboardInterrupt:
            say("\ninterrupted: cleaning up")
        except (ServerError, ConfigError) as exc:
            error(str(exc))
        except (DemoError, psycopg.Error, redis.RedisError) as exc:
            where = {psycopg.Error: "PostgreSQL: ", redis.RedisError: "Redis: "}
            prefix = next((p for t, p in where.items() if isinstance(exc, t)), "")
            hint = "" if keep else " (run `cdc-invalidator demo --keep` to keep the servers' logs)"
            error(f"{prefix}{str(exc).strip()}{hint}")
        finally:
            demo.cleanup(keep)
    return code
