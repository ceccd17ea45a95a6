"""What an in-process simulation must save with each checkpoint to continue exactly where it
stopped: beyond the global model and the momentum buffer (``coordinator.records``), the round
engine's per-client plans and its channel coverage and anchor, and every simulated client's own
state (its plan, the BatchNorm statistics of its last submodel, its budget model's corrections).
Over MQTT the clients keep their own state; in a simulation it dies with the process.

``capture`` gives JSON for ``state.json`` and tensors for ``sim-<round>.safetensors``;
``restore`` puts them back and refuses (``CAHFPError``) a snapshot that does not fit.
"""

from __future__ import annotations

import torch

from cahfp.client_round import ClientState
from cahfp.errors import CAHFPError
from cahfp.pruning.extract import IndexMap
from cahfp.strategies import Strategy
from coordinator.engine import RoundEngine
from coordinator.records import ClientRecord

BUDGET_FIELDS = ("correction", "score_factor", "overhead_s")


def _put_map(out: dict[str, torch.Tensor], prefix: str, imap: IndexMap | None) -> bool | None:
    if imap is None:
        return None
    for key, dims in imap.items():
        for dim, index in dims.items():
            out[f"{prefix}/map/{key}/{dim}"] = index
    return True


def _get_map(tensors: dict[str, torch.Tensor], prefix: str, present: bool | None) -> IndexMap:
    if not present:
        return None
    imap: IndexMap = {}
    start = f"{prefix}/map/"
    for name, index in tensors.items():
        if name.startswith(start):
            key, dim = name[len(start) :].rsplit("/", 1)
            imap.setdefault(key, {})[int(dim)] = index.to(torch.long)
    return imap


def capture(
    engine: RoundEngine, clients: dict[str, ClientState]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The engine's and the clients' state after a round: JSON and tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for side, values in engine.strategy.state().items():
        for gid, v in values.items():
            tensors[f"{side}/{gid}"] = v
    engine_clients = {}
    for cid, rec in engine.clients.items():
        engine_clients[cid] = {
            "index": rec.index,
            "keep": rec.keep,
            "keep_achieved": rec.keep_achieved,
            "planned_round": rec.planned_round,
            "planned_keep": rec.planned_keep,
            "map": _put_map(tensors, f"engine/{cid}", rec.index_map),
        }
    client_states = {}
    for cid, st in clients.items():
        for k, v in (st.statistics or {}).items():
            tensors[f"client/{cid}/stats/{k}"] = v
        client_states[cid] = {
            "keep_achieved": st.keep_achieved,
            "map": _put_map(tensors, f"client/{cid}", st.index_map),
            "statistics": st.statistics is not None,
            "budget": (
                {f: getattr(st.device.model, f) for f in BUDGET_FIELDS} if st.device else None
            ),
        }
    meta = {"engine_clients": engine_clients, "client_states": client_states}
    registry = {cid: {"index": r.index, "keep": r.keep} for cid, r in engine.clients.items()}
    return {"clients": registry, "simulation": meta}, tensors


def load_strategy_state(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    """Put the federation-wide state ``capture`` saved (``<side>/<group id>`` tensors, e.g.
    CA-HFP's coverage and anchor) back into ``strategy``."""
    saved = {}
    for side in strategy.STATE:
        found = {int(n.split("/", 1)[1]): v for n, v in tensors.items() if n.startswith(side)}
        saved[side] = found or None
    strategy.load_state(saved)


def restore(
    engine: RoundEngine,
    clients: dict[str, ClientState],
    entry: dict,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Put a ``capture`` back into a freshly built engine and clients."""
    meta = entry.get("simulation")
    if not isinstance(meta, dict):
        raise CAHFPError(
            f"the checkpoint of round {entry.get('round')} holds no simulation state "
            "(written by the MQTT coordinator, or before simulations could resume)"
        )
    try:
        saved_clients, saved_states = meta["engine_clients"], meta["client_states"]
        if set(saved_states) != set(clients):
            raise CAHFPError(
                f"the checkpoint has {len(saved_states)} clients, the configuration "
                f"{len(clients)} (federation.clients or the data changed?)"
            )
        load_strategy_state(engine.strategy, tensors)
        engine.clients = {}
        for cid, r in sorted(saved_clients.items(), key=lambda kv: kv[1]["index"]):
            engine.clients[cid] = ClientRecord(
                cid,
                r["index"],
                r["keep"],
                _get_map(tensors, f"engine/{cid}", r["map"]),
                r["keep_achieved"],
                r["planned_round"],
                r["planned_keep"],
            )
        for cid, s in saved_states.items():
            st = clients[cid]
            st.keep_achieved = s["keep_achieved"]
            st.index_map = _get_map(tensors, f"client/{cid}", s["map"])
            prefix = f"client/{cid}/stats/"
            st.statistics = (
                {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
                if s["statistics"]
                else None
            )
            if s["budget"] and st.device is not None:
                for f in BUDGET_FIELDS:
                    setattr(st.device.model, f, float(s["budget"][f]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CAHFPError(
            f"the checkpoint's simulation state is malformed ({type(exc).__name__}: {exc})"
        ) from None
