"""In-process broadcaster of model changes, behind WatchModel.

Every change the catalog makes is published here after it is committed.
Watchers get the model after each change, in order; a slow watcher's queue is
bounded and drops the oldest change (the latest state is what matters).
Changes made by another catalog replica reach watchers of that replica only.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from modelyard.catalog.v1 import model_pb2


@dataclass(frozen=True)
class ModelChange:
    """A committed change: the model after it, or `deleted`."""

    model: model_pb2.Model
    deleted: bool = False


class ModelEvents:
    """Publish/subscribe of model changes by model id."""

    def __init__(self, queue_size: int = 64) -> None:
        self._queue_size = queue_size
        self._watchers: dict[str, set[asyncio.Queue[ModelChange]]] = defaultdict(set)

    def publish(self, model_id: str, model: model_pb2.Model, *, deleted: bool = False) -> None:
        """Send a change to every watcher of `model_id` (call from the event loop)."""
        change = ModelChange(model=model, deleted=deleted)
        for queue in list(self._watchers.get(model_id, ())):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(change)

    def subscribe(self, model_id: str) -> asyncio.Queue[ModelChange]:
        """A queue receiving the changes of `model_id` until `unsubscribe`."""
        queue: asyncio.Queue[ModelChange] = asyncio.Queue(self._queue_size)
        self._watchers[model_id].add(queue)
        return queue

    def unsubscribe(self, model_id: str, queue: asyncio.Queue[ModelChange]) -> None:
        """Stop delivering to `queue`."""
        watchers = self._watchers.get(model_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[model_id]

    def watcher_count(self, model_id: str) -> int:
        """Number of active watchers of `model_id`."""
        return len(self._watchers.get(model_id, ()))
