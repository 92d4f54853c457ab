"""Persistence: engine and sessions, ORM models, migrations, the packed-block codec.

One repository module per aggregate. Knows no HTTP and no domain rules.
"""
