"""Package data: the locustfile, shipped in the marrowdx wheel as ``marrowdx.loadtests`` and
located by ``marrowdx.resources`` (locust loads it by path)."""
