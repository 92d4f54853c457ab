"""Persistence: engine and sessions, ORM models, migrations, the packed-block codec.

One repository module per aggregate (:mod:`.runs`, :mod:`.series`, :mod:`.events`,
:mod:`.tokens`, :mod:`.scrape`). Knows no HTTP and no domain rules: it takes and returns
plain values, ORM rows and its own column enums.

Every repository function takes an open :class:`~sqlalchemy.orm.Session`, runs a few
statements in its current transaction (beginning one if needed) and never commits: the caller
owns the transaction. Calls block on the database. A session belongs to one thread at a time.
"""
