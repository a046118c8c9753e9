"""EventLog: the ordered, replayable frames of each turn."""
