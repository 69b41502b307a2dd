"""The registry protocol's vocabulary: names, digests, errors, media types. Pure: no I/O."""
