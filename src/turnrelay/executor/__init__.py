"""The executor: takes turns from the queue and runs them."""
