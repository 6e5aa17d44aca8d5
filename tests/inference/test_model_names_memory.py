"""Per-name structures of the model manager are bounded: unknown names leave nothing behind."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from inference_service.models import ModelManager
from server_kit import errors


def _manager() -> ModelManager:
    return ModelManager(None, {}, lambda *args: None)  # type: ignore[arg-type]


def test_unknown_model_names_leave_no_lock_behind() -> None:
    manager = _manager()

    async def main() -> None:
        for _ in range(2000):
            name = f"models/{uuid.uuid4().hex}"
            with pytest.raises(errors.FailedPrecondition):
                await manager.load(name)
            with pytest.raises(errors.FailedPrecondition):
                await manager.load_any(name)
            with pytest.raises(errors.FailedPrecondition):
                await manager.load_image(name)

    asyncio.run(main())
    assert len(manager._loading) == 0


def test_one_load_per_name_at_a_time_still_holds() -> None:
    """The per-name lock still serializes loads of one name while it is held, then goes away."""
    manager = _manager()
    order: list[str] = []

    async def hold(tag: str) -> None:
        async with manager._loading.hold("models/x"):
            order.append(f"{tag}-in")
            await asyncio.sleep(0.01)
            order.append(f"{tag}-out")

    async def main() -> None:
        await asyncio.gather(hold("a"), hold("b"), hold("c"))

    asyncio.run(main())
    assert order == ["a-in", "a-out", "b-in", "b-out", "c-in", "c-out"]
    assert len(manager._loading) == 0
