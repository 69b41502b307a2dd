"""The only code that talks to another registry."""
