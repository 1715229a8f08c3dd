"""Ray Serve's request-router hook running the prefix-affinity policy of affinity.py.

Ray calls `choose_replicas` for every handle call to the engine deployment, in the process holding the handle (the
ingress). The request's prefix hashes travel as the call's `prefix` keyword; a replica's load is the number of
requests it has outstanding, as Ray's queue-length cache knows it (updated on every send and completion, probed
when missing). The first rank holds the chosen replica; the second the others, which Ray tries (least loaded
first) only when the chosen one is full (`max_ongoing_requests`). Where the request really went is recorded in
`on_request_routed`.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from turbofan.distributed.affinity import DEFAULT_THRESHOLD, AffinityTable


def _prefixes(pending_request: PendingRequest | None) -> list[str]:
    return (pending_request.kwargs.get("prefix") or []) if pending_request is not None else []


class PrefixAffinityRouter(RequestRouter):
    """Fewest outstanding requests, with prefix affinity (the policy: affinity.AffinityTable)."""

    def initialize_state(self, threshold: int = DEFAULT_THRESHOLD, **_kwargs) -> None:
        self.threshold = threshold
        self.table = AffinityTable()

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        loads, missing = {}, []
        for r in replicas:
            n = self._replica_queue_len_cache.get(r.replica_id)
            if n is None:
                missing.append(r)
            else:
                loads[r.replica_id.unique_id] = n
        # A new replica, or an expired cache entry: ask (a probe left unanswered leaves it out this round).
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                if n is not None:
                    loads[r.replica_id.unique_id] = n
        return loads

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        loads = await self._loads(candidate_replicas)
        if not loads:
            return [candidate_replicas]
        chosen = self.table.choose(_prefixes(pending_request), loads, self.threshold)
        pick = [r for r in candidate_replicas if r.replica_id.unique_id == chosen]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id != chosen]
        return [pick, rest] if rest else [pick]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.table.record(_prefixes(pending_request), replica_id.unique_id)
