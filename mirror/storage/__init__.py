"""The local disk: content-addressed blob files and the index. Never HTTP, never the upstream."""
