"""The HTTP API: routes, SSE encoding, auth, and the stream hub."""
