"""Per-user state in changelog-backed Faust tables: what the service knows about a user (`context`), what it
answered them (`served`), and the watchdog that keeps the tables' recovery moving (`recovery`)."""
