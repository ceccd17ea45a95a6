"""The round engine's client registry and selection: who is known, with which budget (its own
measurement, capped; or a fixed tier), who may take part, who is selected for a round."""

from __future__ import annotations

import random

from coordinator.records import ClientRecord


class ClientRegistry:
    """Mixed into ``RoundEngine``: uses its ``cfg``, ``clients``, ``transport``, ``strategy``,
    ``self_budget``, ``_announced`` and ``on_event``."""

    def register(
        self, cid: str, measured: float | None = None, restored: bool = False
    ) -> ClientRecord:
        """Add a client that appeared (e.g. sent its hello) with the keep its own measurement
        chose (None: it does not measure itself), or (``restored``) the keep a checkpoint
        recorded for it; its index fixes its seeds."""
        index = len(self.clients)
        rec = self.clients[cid] = ClientRecord(cid, index, 1.0)
        self._announced[cid] = measured
        if self.self_budget:
            self._adopt(rec, measured)
            wanted = 1.0 if measured is None else measured
            source = "its own measurement" if measured is not None else "it does not measure"
            source = "restored from the checkpoint" if restored else source
            if rec.keep < wanted:
                source += f", capped at clients.max_keep {self.cfg.clients.max_keep:g}"
        else:
            rec.keep = self.cfg.keep_of(index)
            source = "fixed tier" + (f"; it measured {measured:.2f}" if measured else "")
        self.on_event("registered", {"client": cid, "keep": rec.keep, "source": source})
        return rec

    def _adopt(self, rec: ClientRecord, measured: float | None) -> None:
        """Take a device's own choice of keep, capped at the federation's maximum (never
        replaced: a device that measured nothing is taken as able to train the dense model)."""
        rec.keep = min(1.0 if measured is None else measured, self.cfg.clients.max_keep)

    def eligible(self) -> list[str]:
        available = set(self.transport.clients())
        for cid in sorted(available - set(self.clients)):
            self.register(cid, self.transport.keep_estimate(cid))
        if self.self_budget:  # a device re-announces its keep when its measurement changes
            for cid in sorted(available & set(self.clients)):
                estimate = self.transport.keep_estimate(cid)
                if estimate is not None and estimate != self._announced.get(cid):
                    self._announced[cid] = estimate
                    self._adopt(self.clients[cid], estimate)
        return [
            c
            for c in sorted(self.clients)
            if c in available
            and self.clients[c].keep > 0
            and self.strategy.eligible(self.clients[c].keep)
        ]

    def select(self, rnd: int) -> list[str]:
        ids = self.eligible()
        if not ids:
            return []
        count = max(1, round(self.cfg.federation.participation * len(ids)))
        rng = random.Random(self.cfg.federation.seed * 100_003 + rnd)
        return sorted(rng.sample(ids, min(count, len(ids))))
