"""Persistence: SQLAlchemy models (:mod:`app.db.models`) and engines/sessions (:mod:`app.db.session`)."""
