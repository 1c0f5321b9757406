"""Throughput benchmarks and load tests of the served stack.

``marrowdx bench`` (:mod:`marrowdx.bench.cli`) measures, on one simulated image set
(:mod:`~marrowdx.bench.workload`), the limit (:mod:`~marrowdx.bench.limit`: the in-process
pipeline, no server), the peer (:mod:`~marrowdx.bench.peer`: the same pipeline behind a
one-request-at-a-time gRPC server) and the served stack (:mod:`~marrowdx.bench.served`: the
Triton ensemble through the client), with Triton's per-model statistics
(:mod:`~marrowdx.bench.triton_stats`) and a JSON + PNG report (:mod:`~marrowdx.bench.report`).
What every workload needs around a measurement (repository, server, host description,
progress log) is in :mod:`~marrowdx.bench.harness`.
``python -m marrowdx.bench.loadtest`` runs ``loadtests/locustfile.py`` headless (and the soak).
Heavy imports happen inside functions, so importing this package stays cheap.
"""
