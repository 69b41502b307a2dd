"""The pull side: content read through from upstreams and cached (``service``), the blob miss path (``blobs``), the
coordination of fetches (``inflight``) and the one domain -> OCI error table (``failures``)."""
