"""TurnQueue: hands turns to executors and broadcasts cancels."""
