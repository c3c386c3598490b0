"""Alembic environment: runs on the connection the coordinator hands over.

`coordinator.storage.Storage.upgrade()` puts its connection into
`config.attributes["connection"]`; the `alembic` command line (with an alembic.ini that
sets `sqlalchemy.url`) works too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from coordinator.storage.models import metadata

config = context.config


def _run(connection) -> None:  # noqa: ANN001 - alembic's Connection
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
