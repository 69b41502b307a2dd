"""The benchmark harness (issue 6): the mirror side by side with CNCF Distribution in proxy mode and nginx serving
the same cached file with sendfile, on loopback, on data it generates itself. Not part of the test run (no
``test_*`` modules here; ``norecursedirs`` in pyproject). Run ``python -m tests.bench --quick`` (about a minute)
or ``python -m tests.bench`` (the full run); see README "Performance".

Modules: ``servers`` starts the four servers, ``data`` makes random incompressible blobs and images and pushes them
to the upstream, ``load`` holds the load clients (a raw-socket HTTP getter, wrk, skopeo) and the RSS sampler,
``workloads`` the measurements, ``report`` the table and the JSON."""
