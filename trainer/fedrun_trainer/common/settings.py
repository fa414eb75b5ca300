"""The run's configuration as the trainer reads it: the FederatedRun from the ConfigMap.

The ConfigMap holds the whole FederatedRun (``fedrun render`` writes it), so the server,
every hospital and the operator validate and read one and the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedrun_core.api import FederatedRun, Hospital, TrainingSpec, load_run


class HospitalConfigError(LookupError):
    """This process was started for a hospital the run does not have."""


@dataclass(frozen=True)
class RunSettings:
    """Read-only view of a FederatedRun with the names the trainer uses."""

    run: FederatedRun

    @classmethod
    def load(cls, path: str) -> RunSettings:
        """Load and validate the run configuration file (YAML or JSON)."""
        return cls(load_run(path))

    @property
    def run_name(self) -> str:
        return self.run.metadata.name

    @property
    def run_uid(self) -> str:
        """The run's uid (empty for a run that never went through the API or the local runner)."""
        return self.run.metadata.uid or ""

    @property
    def secure(self) -> bool:
        """Whether the run uses TLS and node authentication (the default)."""
        security = self.run.spec.security
        return not (security is not None and security.insecure)

    @property
    def hospital_names(self) -> list[str]:
        return [h.name for h in self.run.spec.hospitals]

    def hospital(self, name: str) -> Hospital:
        """The named hospital's spec; :class:`HospitalConfigError` if the run has none."""
        for h in self.run.spec.hospitals:
            if h.name == name:
                return h
        raise HospitalConfigError(
            f"hospital {name!r} is not in spec.hospitals of run {self.run_name} "
            f"(have: {', '.join(self.hospital_names)})"
        )

    @property
    def rounds(self) -> int:
        return self.run.spec.rounds

    @property
    def min_hospitals(self) -> int:
        return self.run.spec.min_hospitals

    @property
    def round_timeout_s(self) -> float:
        return float(self.run.spec.round_timeout_seconds)

    @property
    def strategy(self) -> str:
        return self.run.spec.strategy.name

    @property
    def server_learning_rate(self) -> float:
        return float(self.run.spec.strategy.server_learning_rate or 0.1)

    @property
    def proximal_mu(self) -> float:
        s = self.run.spec.strategy
        return float(s.proximal_mu or 0.0) if s.name == "FedProx" else 0.0

    @property
    def privacy_enabled(self) -> bool:
        return self.run.spec.privacy.enabled

    @property
    def target_epsilon(self) -> float:
        return float(self.run.spec.privacy.target_epsilon)

    @property
    def delta(self) -> float:
        return float(self.run.spec.privacy.delta)

    @property
    def accountant(self) -> str:
        return self.run.spec.privacy.accountant

    @property
    def seed(self) -> int:
        return self.run.spec.training.seed

    @property
    def mlflow_tracking_uri(self) -> str | None:
        return self.run.spec.mlflow.tracking_uri

    @property
    def mlflow_experiment(self) -> str:
        return self.run.spec.mlflow.experiment_name

    def model_spec(self) -> TrainingSpec:
        return self.run.spec.training

    def mlflow_params(self) -> dict[str, Any]:
        """Flat parameters worth comparing across runs."""
        spec = self.run.spec
        t, p = spec.training, spec.privacy
        return {
            "run": self.run_name,
            "rounds": spec.rounds,
            "min_hospitals": spec.min_hospitals,
            "hospitals": ",".join(self.hospital_names),
            "strategy": spec.strategy.name,
            "proximal_mu": self.proximal_mu,
            "model": t.model,
            "hidden_sizes": ",".join(str(x) for x in t.hidden_sizes or []),
            "local_epochs": t.local_epochs,
            "batch_size": t.batch_size,
            "learning_rate": t.learning_rate,
            "seed": t.seed,
            "data_preset": spec.data.preset or "custom",
            "dp_enabled": p.enabled,
            "target_epsilon": p.target_epsilon,
            "delta": p.delta,
            "max_grad_norm": p.max_grad_norm,
            "accountant": p.accountant,
        }
