"""Experiments that answer a question with seeds and error bars (each one a command)."""
