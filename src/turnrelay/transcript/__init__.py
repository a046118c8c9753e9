"""The Claude Code CLI's transcripts: stored per chat session in object storage
(``store``) and stripped of what never reaches the model (``strip``)."""
