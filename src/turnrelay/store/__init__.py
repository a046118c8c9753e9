"""ChatStore: sessions, messages and turns in a SQL database."""
