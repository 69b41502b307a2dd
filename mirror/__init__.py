"""mirror: a pull-through caching mirror for container images.

Glossary (one word per concept, used everywhere in the code):

upstream  another registry the mirror fetches from (Docker Hub by default), named by the host clients use
          for it (``docker.io``, ``ghcr.io``).
store     the local disk: content-addressed blob files plus an index of tags and manifest metadata.
repo      a repository path inside one upstream, e.g. ``library/alpine`` on ``docker.io``.
ref       what follows ``/manifests/``: a tag or a digest.
digest    ``algorithm:hex`` naming content by its hash; the cache key of every blob and manifest.
hit       a request answered from the store without talking to the upstream.
miss      a request that had to go to the upstream; its bytes are teed into the store.
stale     an answer for a tag served from the store because the upstream could not be asked.
"""
