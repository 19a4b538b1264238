//! The PostgreSQL store for txbus (being built: see the open issue).
