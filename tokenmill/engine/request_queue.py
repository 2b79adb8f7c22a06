"""Waiting queues, one per scheduling policy (a registry, not an if/elif in the scheduler).

Contract shared by every queue:
- ``peek()`` is the next request to admit (None when empty); ``pop()`` removes it.
- ``add`` enqueues a new request; ``add_preempted`` a request the scheduler just preempted.
- ``discard`` forgets a request that was finished while waiting: O(1); the entry is dropped
  lazily by ``peek`` (it skips requests whose status is FINISHED).
- ``len()`` counts live requests only.
"""

from __future__ import annotations

import heapq
from collections import deque

from tokenmill.engine.request import Request, RequestStatus

_FINISHED = RequestStatus.FINISHED


class RequestQueue:
    """Base: a queue of waiting requests (see the module docstring)."""

    def __init__(self) -> None:
        self._num_live = 0

    def __len__(self) -> int:
        return self._num_live

    def add(self, request: Request) -> None:
        raise NotImplementedError

    def add_preempted(self, request: Request) -> None:
        raise NotImplementedError

    def peek(self) -> Request | None:
        raise NotImplementedError

    def pop(self) -> Request:
        raise NotImplementedError

    def discard(self, request: Request) -> None:
        """``request`` (already marked FINISHED) is in the queue: stop counting it."""
        self._num_live -= 1


class FcfsQueue(RequestQueue):
    """Arrival order; preempted requests go back to the front."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)
        self._num_live += 1

    def add_preempted(self, request: Request) -> None:
        self._queue.appendleft(request)
        self._num_live += 1

    def peek(self) -> Request | None:
        queue = self._queue
        while queue and queue[0].status is _FINISHED:
            queue.popleft()
        return queue[0] if queue else None

    def pop(self) -> Request:
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty queue")
        self._queue.popleft()
        self._num_live -= 1
        return request


class PriorityQueue(RequestQueue):
    """Lowest ``(priority, arrival_time, order)`` first; preempted requests keep their key."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[tuple[int, float, int], Request]] = []

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.sort_key, request))
        self._num_live += 1

    add_preempted = add

    def peek(self) -> Request | None:
        heap = self._heap
        while heap and heap[0][1].status is _FINISHED:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def pop(self) -> Request:
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty queue")
        heapq.heappop(self._heap)
        self._num_live -= 1
        return request


QUEUES: dict[str, type[RequestQueue]] = {"fcfs": FcfsQueue, "priority": PriorityQueue}
