"""Adapter-affinity routing: a Serve request router keyed by the multiplexed model id.

Serve's default router (power of two choices with multiplexing) prefers replicas that
advertise the model id, but it gives up on them when a queue-length probe is slow, and a
routing task that has no request of its own picks two random replicas and hands one to
the oldest pending request, whatever its adapter. On a loaded machine about a third of an
adapter's requests landed on the wrong replica. This router keeps the rule strict:

- a request for an adapter goes to the least loaded replica that advertises it;
- an adapter nobody advertises yet goes to the least loaded replica, ties broken by the
  fewest advertised adapters, then by rendezvous hashing (adapter, replica), so that
  concurrent first requests agree while loads are level;
- only when the home has more than ``imbalance`` requests in flight beyond the least
  loaded replica does a request spill there, which then loads the adapter and advertises
  it too (a hot adapter ends up on several replicas, as dLoRA replicates hot adapters);
- requests without an adapter (and the benchmark's adapter-blind baseline) use power of
  two choices.

Requests are fulfilled in FIFO order, preferring one with the same adapter (FIFOMixin). A
routing task with no request of its own routes for the oldest pending one, which is the
request FIFOMixin hands its replica to.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

DEFAULT_IMBALANCE = 12


def _score(adapter: str, replica: RunningReplica) -> int:
    digest = hashlib.blake2b(f"{adapter}\0{replica.replica_id.unique_id}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    # A replica answers queue-length probes from a process whose engine thread holds the
    # GIL between steps; Serve's 0.1 s default drops busy but healthy replicas too often.
    queue_len_response_deadline_s = 0.5

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs) -> None:
        self.imbalance = int(imbalance)

    def _load(self, replica: RunningReplica) -> int:
        # The router's cached count of requests it has on the replica (0 if unknown).
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _oldest_pending(self) -> PendingRequest | None:
        # The request FIFOMixin gives a replica to when the task routed for none. Reads the
        # base class's queue (Ray 2.55.1, pinned); tests/test_cluster.py checks the routing.
        for pending in self._pending_requests_to_fulfill:
            if not pending.future.done():
                return pending
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = pending_request or self._oldest_pending()
        if request is not None:
            # Back off between rounds when no candidate took the request (Serve's mixins
            # set this too); without it a slow replica is probed in a tight loop.
            request.routing_context.should_backoff = True
        adapter = request.metadata.multiplexed_model_id if request is not None else ""
        if not adapter:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        least = min(candidate_replicas, key=self._load)
        homes = sorted((r for r in candidate_replicas if adapter in r.multiplexed_model_ids),
                       key=self._load)
        if not homes:
            # A new adapter: the least loaded replica, then the one advertising fewest
            # adapters, then the hash (so concurrent first requests agree).
            homes = [min(candidate_replicas, key=lambda r: (
                self._load(r), len(r.multiplexed_model_ids), -_score(adapter, r)))]
        if self._load(homes[0]) - self._load(least) <= self.imbalance:
            return [homes]  # only there: if it is full the router backs off and asks again
        return [[least], homes]
