"""What travels down with a task: the dense global model with the side tensors its strategy
attaches (encoded once per round and shared by every dense task), or the slice a client's plan
keeps; and how the transport rebuilds either for a resend instead of holding it in memory."""

from __future__ import annotations

from cahfp.messages import TaskMessage
from cahfp.pruning.extract import slice_tensor
from cahfp.wire import encode_update
from coordinator.records import ClientRecord


class PayloadCache:
    """Mixed into ``RoundEngine``: uses its ``state``, ``clients`` and ``strategy``."""

    _dense_cache: tuple[tuple, bytes] = ((), b"")

    def _dense_payload(self, rnd: int, sides: tuple[str, ...]) -> bytes:
        """The dense global model with the requested side tensors, encoded once per round
        (every dense task shares it)."""
        key = (rnd, sides)
        if self._dense_cache[0] != key:
            extras = self.strategy.side_tensors(sides)
            self._dense_cache = (key, encode_update(self.state, {}, extras=extras))
        return self._dense_cache[1]

    def _slice(self, rec: ClientRecord, statistics: bool = True) -> bytes:
        imap = rec.index_map or {}
        tensors = {k: slice_tensor(v, imap.get(k, {})) for k, v in self.state.items()}
        meta = {"keep_achieved": rec.keep_achieved}
        return encode_update(tensors, imap, meta, statistics=statistics)

    def _rebuilder(self, task: TaskMessage):
        rec = self.clients[task.client_id]
        if task.payload == "slice":
            return lambda: self._slice(rec, task.statistics)
        sides = self.strategy.side_names(task.plan)
        return lambda: self._dense_payload(task.round, sides)
