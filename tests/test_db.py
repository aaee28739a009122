"""Schema and migrations: up and down on PostgreSQL and SQLite, constraints, cascades."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError

from app.db import models
from app.db.models import Artwork, ArtworkPhrase, Caption, Fragment, Phrase, Region
from app.db.session import create_db_engine, current_revision, database_url, downgrade, upgrade

TABLES = {"artworks", "captions", "phrases", "artwork_phrases", "regions", "fragments",
          "annotations", "index_builds", "api_keys", "index_changes", "index_log_horizon"}


def new_artwork(external_id: str = "a-1") -> Artwork:
    return Artwork(
        external_id=external_id, title="Vase", meta={"source": "synth", "classification": "vase"},
        image_location="images/a.png", image_sha256="0" * 64, content_sha256="1" * 64,
        width=64, height=48, split="train",
    )


def test_migrations_match_the_models_and_go_down_and_up(db_url):
    engine = create_db_engine(db_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert current_revision(engine) == "0003"
    with engine.connect() as connection:
        # The migration builds exactly the schema the models describe (no drift).
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, models.Base.metadata) == []
    downgrade(db_url, "base")
    inspect_after = inspect(engine)
    assert not TABLES & set(inspect_after.get_table_names())
    upgrade(db_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_rows_cascade_and_constraints_hold(db_session):
    artwork = new_artwork()
    artwork.captions = [Caption(position=0, text="A blue vase.")]
    artwork.regions = [Region(store_row=0, x1=0, y1=0, x2=64, y2=48, score=1.0, kind=0)]
    artwork.fragments = [Fragment(x1=0, y1=0, x2=64, y2=48, source="whole", region_rows=[0, 3])]
    phrase = Phrase(text="blue vase")
    artwork.phrase_links = [ArtworkPhrase(phrase=phrase)]
    db_session.add(artwork)
    db_session.commit()
    stored = db_session.scalar(select(Artwork).where(Artwork.external_id == "a-1"))
    assert stored.meta == {"source": "synth", "classification": "vase"}
    assert stored.fragments[0].region_rows == [0, 3] and stored.created_at is not None
    # JSON metadata fields are queryable the same way on both databases (search filters).
    assert db_session.scalar(
        select(func.count()).where(Artwork.meta["classification"].as_string() == "vase")
    ) == 1

    db_session.add(new_artwork("a-1"))
    with pytest.raises(IntegrityError):
        db_session.commit()
    db_session.rollback()

    # Deleting in SQL (not through the ORM) still cascades: the database enforces it.
    db_session.execute(models.Artwork.__table__.delete())
    db_session.commit()
    for table in (Caption, Region, Fragment, ArtworkPhrase):
        assert db_session.scalar(select(func.count()).select_from(table)) == 0
    assert db_session.scalar(select(func.count()).select_from(Phrase)) == 1


def test_ids_of_deleted_rows_are_not_reused(db_session):
    first = new_artwork("a-1")
    first.fragments = [Fragment(x1=0, y1=0, x2=1, y2=1, source="whole", region_rows=[0])]
    db_session.add(first)
    db_session.commit()
    old_id = first.fragments[0].id
    db_session.delete(first)
    db_session.commit()
    second = new_artwork("a-2")
    second.fragments = [Fragment(x1=0, y1=0, x2=1, y2=1, source="whole", region_rows=[0])]
    db_session.add(second)
    db_session.commit()
    assert second.fragments[0].id > old_id  # FAISS ids must never name two fragments


def test_database_url_resolution(monkeypatch):
    monkeypatch.delenv("ARTALIGN_DATABASE_URL", raising=False)
    assert database_url() == "sqlite:///var/artalign.db"
    monkeypatch.setenv("ARTALIGN_DATABASE_URL", "postgresql://u@h/db")
    assert database_url() == "postgresql+psycopg://u@h/db"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="mysql://u@h/db"):
        database_url("mysql://u@h/db")


def test_db_commands(tmp_path, capsys):
    from app.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "current", "--database-url", url]) == 0
    assert "none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert main(["db", "current", "--database-url", url]) == 0
    assert capsys.readouterr().out.strip().endswith("0003")
    assert main(["db", "downgrade", "base", "--database-url", url]) == 0
    engine = create_db_engine(url)
    assert not TABLES & set(inspect(engine).get_table_names())
    engine.dispose()
    assert main(["db", "upgrade", "--database-url", "mysql://x@y/z"]) == 2
    assert "mysql://x@y/z" in capsys.readouterr().err
