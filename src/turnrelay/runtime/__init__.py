"""AgentRuntime: runs one turn against a model and yields what happens."""
