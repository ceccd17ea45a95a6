"""Mirror a run's per-round metrics to an experiment tracker (``--tracking``): TensorBoard
(``tensorboard:DIR``, the ``[tensorboard]`` extra) or MLflow (``mlflow:URI``, any tracking URI,
the ``[mlflow]`` extra). ``metrics.jsonl`` stays the record: a tracker that fails while the run
goes on is reported once and then left out, and never stops the run."""

from __future__ import annotations

import logging

from cahfp.config import Config
from cahfp.errors import CAHFPError

log = logging.getLogger("cahfp.tracking")
KINDS = ("tensorboard", "mlflow")


def parse_tracking(spec: str) -> tuple[str, str]:
    """``KIND:TARGET`` as its two parts; one line when malformed."""
    kind, sep, target = spec.partition(":")
    if kind not in KINDS or not sep or not target:
        raise CAHFPError(f"--tracking expects tensorboard:DIR or mlflow:URI, got {spec!r}")
    return kind, target


def round_metrics(rec) -> dict[str, float]:
    """The numbers of one ``RoundRecord`` a tracker shows."""
    ok = [c for c in rec.clients if c.status == "ok"]
    out = {
        "updates": float(rec.aggregated),
        "round_seconds": rec.seconds,
        "aggregate_seconds": rec.aggregate_seconds,
        "statistics_seconds": rec.statistics_seconds,
        "uplink_mb": sum(c.bytes_up for c in rec.clients) / 1e6,
        "downlink_mb": sum(c.bytes_down for c in rec.clients) / 1e6,
    }
    if rec.accuracy is not None:
        out["accuracy"], out["loss"] = rec.accuracy, rec.loss
    keeps = [c.keep_achieved for c in ok if c.keep_achieved is not None]
    if keeps:
        out["mean_keep"] = sum(keeps) / len(keeps)
    return out


def _params(cfg: Config) -> dict[str, str]:
    """The configuration, flattened to ``section.key`` strings."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            out[f"{section}.{key}"] = str(value)[:500]
    return out


class Tracker:
    """One run's mirror. ``event`` follows the round engine's events; ``close`` ends it."""

    def __init__(self, spec: str, cfg: Config, run_name: str):
        self.kind, self.target = parse_tracking(spec)
        self.broken = False
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CAHFPError(
                    "--tracking tensorboard needs TensorBoard: pip install "
                    "'cahfp-edge[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(log_dir=self.target)
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in
                                                    _params(cfg).items()))  # fmt: skip
        else:
            try:
                import mlflow
            except ImportError:
                raise CAHFPError(
                    "--tracking mlflow needs MLflow: pip install 'cahfp-edge[mlflow]'"
                ) from None
            self.mlflow = mlflow
            try:
                mlflow.set_tracking_uri(self.target)
                mlflow.set_experiment(cfg.federation.name)
                self.run = mlflow.start_run(run_name=run_name)
                mlflow.log_params(_params(cfg))
            except Exception as exc:  # the tracker's own errors: unreachable server, bad URI
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CAHFPError(
                    f"MLflow at {self.target}: {type(exc).__name__}: {first}"
                ) from None

    def event(self, kind: str, data: dict) -> None:
        if kind not in ("initial", "round_end") or self.broken:
            return
        rec = data["record"]
        values = round_metrics(rec)
        try:
            if self.kind == "tensorboard":
                for name, value in values.items():
                    self.writer.add_scalar(name, value, rec.round)
                self.writer.flush()
            else:
                self.mlflow.log_metrics(values, step=rec.round)
        except Exception as exc:  # never stop the run for the mirror
            self.broken = True
            log.warning("tracking to %s stopped: %s: %s", self.target, type(exc).__name__, exc)

    def close(self) -> None:
        try:
            if self.kind == "tensorboard":
                self.writer.close()
            else:
                self.mlflow.end_run()
        except Exception as exc:
            log.warning("tracking to %s: closing failed: %s", self.target, exc)
