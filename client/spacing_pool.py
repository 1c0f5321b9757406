"""One patient's pixel-spacing estimates, pooled for the images whose own red cells are too few.

A single-cell crop shows one to three red cells, so its own estimate scatters widely (README
"Any magnification"). Images of one size from one patient came from one camera and share a
spacing, so an image whose own estimate is uncertain takes the pool of the patient's images of
its size (``marrowdx.spacing.pool_uncertain``). It waits, outside the client's concurrency
slots, until every image of the patient has been estimated; an image with a certain estimate
goes on at once, so fields that carry enough red cells are not delayed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from marrowdx.spacing import SpacingEstimate


class SpacingPool:
    """The estimates of ``n_images`` images (slots 0..n-1) of one patient.

    Every slot is ``add``-ed exactly once with ``client.fields.own_estimate``'s answer
    (((width, height), estimate), or None when the image has none: unreadable, failed,
    beyond the limits), so that the images waiting on the pool are never left waiting.
    """

    def __init__(self, n_images: int) -> None:
        self._n = n_images
        self._own: dict[int, tuple[tuple[int, int], SpacingEstimate] | None] = {}
        self._complete = asyncio.Event()
        self._resolved: dict[int, SpacingEstimate] | None = None
        if n_images == 0:
            self._complete.set()

    def add(self, slot: int, own: tuple[tuple[int, int], SpacingEstimate] | None) -> None:
        if not 0 <= slot < self._n or slot in self._own:
            raise ValueError(f"slot {slot} added twice or outside 0..{self._n - 1}")
        self._own[slot] = own
        if len(self._own) == self._n:
            self._complete.set()

    def ready(self, slot: int) -> bool:
        """Whether ``slot``'s spacing is known without waiting (its own estimate is certain,
        or it has none)."""
        own = self._own[slot]
        return own is None or not own[1].uncertain or self._complete.is_set()

    async def resolve(self, slot: int) -> SpacingEstimate | None:
        """``slot``'s estimate: its own when certain, else (once every slot is in) the
        pool of its size where that holds more red cells; None when it had none."""
        own = self._own[slot]
        if own is None or not own[1].uncertain:
            return None if own is None else own[1]
        await self._complete.wait()
        if self._resolved is None:
            self._resolved = self._pool()
        return self._resolved[slot]

    def _pool(self) -> dict[int, SpacingEstimate]:
        from marrowdx.spacing import pool_uncertain

        slots = [s for s, own in sorted(self._own.items()) if own is not None]
        owns = [self._own[s] for s in slots]
        pooled = pool_uncertain([o[1] for o in owns], [o[0] for o in owns])  # type: ignore[index]
        return dict(zip(slots, pooled, strict=True))
