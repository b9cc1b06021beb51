"""PostgreSQL plumbing shared by every command: the registry of our SQL files and the one
place sessions are made."""
