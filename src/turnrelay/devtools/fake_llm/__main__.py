"""``python -m turnrelay.devtools.fake_llm``: the fake LLM server in the foreground."""

from turnrelay.devtools.fake_llm.server import main

main()
