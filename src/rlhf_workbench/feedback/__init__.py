"""Automatic feedback: ranking sources, the LLM judge, the safety filter, constitutional critique, users' thumbs."""
