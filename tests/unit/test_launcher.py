"""The one Triton launcher's port policy and argument checks (no server is started here;
tests/integration/test_serving_cli.py and the session fixture start real ones)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from marrowdx import config
from marrowdx.errors import ServerError
from marrowdx.serving.server import PortPolicy, first_free_run, free_ports, launch_triton


@contextmanager
def listening(port: int = 0) -> Iterator[int]:
    """A live listener on ``port`` (0: any), so the port is busy while the block runs."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s.getsockname()[1]


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)


def test_free_policy_gives_three_distinct_ports() -> None:
    ports = PortPolicy.free().resolve()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3


def test_fixed_policy_keeps_its_ports_even_when_busy() -> None:
    """``marrowdx serve`` must not move: clients are configured with its ports; the launch
    then fails naming the busy port (TritonServer.start)."""
    with listening() as busy:
        ports = config.Ports(http=busy, grpc=busy + 1, metrics=busy + 2)
        assert PortPolicy.fixed_ports(ports).resolve() == ports


def test_defaults_if_free_falls_back_to_free_ports_when_one_is_busy() -> None:
    with listening() as busy:
        wanted = config.Ports(http=busy, grpc=busy + 1, metrics=busy + 2)
        policy = PortPolicy(fixed=wanted, fall_back_to_free=True)
        chosen = policy.resolve()
        assert busy not in (chosen.http, chosen.grpc, chosen.metrics)


def test_search_skips_a_busy_triple() -> None:
    with listening() as busy:
        chosen = PortPolicy.search_from(busy).resolve()
        assert chosen.http > busy and (chosen.grpc, chosen.metrics) == (
            chosen.http + 1,
            chosen.http + 2,
        )


def test_a_search_without_room_is_a_server_error() -> None:
    with listening() as busy, pytest.raises(ServerError, match="no 1 free"):
        first_free_run(busy, 1, busy + 1)


def test_log_file_and_inherited_output_exclude_each_other(tmp_path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        with launch_triton(tmp_path, log_path=tmp_path / "log", inherit_output=True):
            pass


def test_a_missing_repository_fails_before_triton_starts(tmp_path) -> None:
    pytest.importorskip("psutil", reason="the launcher's process watch needs psutil")
    try:
        from marrowdx.serving.triton_install import ensure_installed

        ensure_installed(tmp_path / "work" / "triton")
    except Exception as exc:  # noqa: BLE001 - any reason the server cannot be unpacked here
        pytest.skip(f"the Triton binary cannot be unpacked here: {exc}")
    with pytest.raises(ServerError, match="does not exist"):
        with launch_triton(tmp_path / "no-repository", work_dir=tmp_path / "work"):
            pass


def test_a_model_process_that_exits_unreadable_is_still_seen_dying(tmp_path, monkeypatch) -> None:
    """A stub killed under Triton first exits (its argv unreadable once its memory is
    released, so it is no longer among the model processes found) and only then turns
    zombie. Watched through that window it is reported dead once gone; dropped from the
    watch at it, as it was, its death went unseen and Triton went on claiming ready. A
    process that Triton replaced (a new one of the same instance) is not reported."""
    from dataclasses import dataclass

    from marrowdx.serving.server import ModelProcess, ServerConfig, TritonServer
    from marrowdx.serving.triton_install import TritonInstall

    running: set[int] = set()

    @dataclass(frozen=True)
    class Stub(ModelProcess):
        def alive(self) -> bool:
            return self.pid in running

    class Triton:
        def poll(self) -> None:
            return None

    preprocess = Stub(101, "preprocess", "preprocess_0_0", 1.0)
    classifier = Stub(102, "classifier", "classifier_0_0", 1.0)
    server = TritonServer(ServerConfig(tmp_path), TritonInstall(tmp_path, tmp_path))
    server.process = Triton()  # type: ignore[assignment]
    server.model_processes = [preprocess, classifier]
    found: list[list[ModelProcess]] = []
    monkeypatch.setattr(server, "current_model_processes", lambda: found[-1])
    running |= {101, 102}
    found.append([preprocess, classifier])
    assert server.dead_models() == []
    found.append([classifier])  # killed: exiting, its argv gone, not yet a zombie
    assert server.dead_models() == []
    running.discard(101)  # a zombie, then reaped
    assert server.dead_models() == [preprocess]
    # a stub Triton replaced, the old one exiting meanwhile, is no death
    server.model_processes = [classifier]
    successor = Stub(103, "classifier", "classifier_0_0", 2.0)
    running.add(103)
    found.append([successor])
    assert server.dead_models() == []
    running.discard(102)
    assert server.dead_models() == []
