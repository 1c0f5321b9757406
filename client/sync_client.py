"""``MarrowClient``: the blocking API, driving ``AsyncMarrowClient`` on a private event loop.

The loop runs in a daemon thread owned by the client, so the blocking calls also work
where an event loop is already running (notebooks, async web apps) and the async logic
exists once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from marrowdx import config
from marrowdx.client.async_client import (
    AsyncMarrowClient,
    ImageCallback,
    ImageSource,
    PatientInput,
    SpacingArg,
)
from marrowdx.client.report import PatientReport
from marrowdx.client.transport import DEFAULT_RETRY_TOTAL_S

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="marrowdx-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


class MarrowClient:
    """Blocking client: the same parameters as ``AsyncMarrowClient`` (see its docstring:
    ``timeout``, ``retry_total_s``, ``retry``, ``concurrency``, ``patients_in_flight``, the
    TLS options, ``target_cells``, ``review``, ``unidentified_below``, ``um_per_pixel``), and
    the same results.
    Use it as ``with MarrowClient(url) as client:`` or call :meth:`close`; callbacks run in
    the client's own thread."""

    def __init__(self, url: str = config.DEFAULT_URL, **options: Any) -> None:
        self._async = AsyncMarrowClient(url, **options)
        self._loop = _LoopThread()
        self.url = url

    @property
    def retries(self) -> int:
        """Requests repeated after a transient failure since the client was created."""
        return self._async.retries

    def __enter__(self) -> MarrowClient:
        """The client itself; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the client's thread; safe to call twice."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def wait_until_ready(
        self,
        max_wait_s: float = DEFAULT_RETRY_TOTAL_S,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Block until the server and the models the client calls are ready, for up to
        ``max_wait_s``; ``on_wait(reason)`` hears each not-ready reason. ``RequestFailed``
        says why it never became ready."""
        self._loop.run(self._async.wait_until_ready(max_wait_s, on_wait))

    def diagnose_patient(
        self,
        patient_id: str,
        images: Iterable[ImageSource],
        labs: Mapping[str, float | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        on_image: ImageCallback | None = None,
        target_cells: int | None = None,
        um_per_pixel: SpacingArg = None,
        spacing_source: str = "given",
    ) -> PatientReport:
        """See ``AsyncMarrowClient.diagnose_patient``; ``on_image`` runs in the client's thread."""
        return self._loop.run(
            self._async.diagnose_patient(
                patient_id,
                images,
                labs,
                names=names,
                on_image=on_image,
                target_cells=target_cells,
                um_per_pixel=um_per_pixel,
                spacing_source=spacing_source,
            )
        )

    def diagnose_cohort(
        self, patients: Iterable[PatientInput], *, on_image: ImageCallback | None = None
    ) -> Iterator[PatientReport]:
        """Reports in input order, as each patient finishes (work continues in between);
        see ``AsyncMarrowClient.diagnose_cohort``."""
        stream = self._async.diagnose_cohort(patients, on_image=on_image)
        try:
            while True:
                try:
                    yield self._loop.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.loop.is_closed():
                self._loop.run(stream.aclose())
