"""Names shared by the API models, the CRD, rendering and the operator.

Changing a value here changes what users and clusters see: the API group, label keys
and ports are part of fedrun's contract (docs/architecture.md).
"""

import re
from typing import Final

# The FederatedRun resource.
GROUP: Final = "fedrun.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FederatedRun"
PLURAL: Final = "federatedruns"
SINGULAR: Final = "federatedrun"
SHORT_NAMES: Final = ("fedrun", "fr")
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# The PrivacyBudget resource: one hospital dataset's lifetime budget (fedrun_core.budgets).
BUDGET_KIND: Final = "PrivacyBudget"
BUDGET_PLURAL: Final = "privacybudgets"
BUDGET_SINGULAR: Final = "privacybudget"
BUDGET_SHORT_NAMES: Final = ("pbudget", "pb")
BUDGET_CRD_NAME: Final = f"{BUDGET_PLURAL}.{GROUP}"

# Labels on every child object.
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_RUN: Final = f"{GROUP}/run"
LABEL_HOSPITAL: Final = f"{GROUP}/hospital"
LABEL_COMPONENT: Final = f"{GROUP}/component"
PART_OF: Final = "fedrun"
MANAGED_BY: Final = "fedrun-operator"
COMPONENT_SERVER: Final = "server"
COMPONENT_HOSPITAL: Final = "hospital"

# Annotations.
ANNOTATION_IRSA_ROLE: Final = "eks.amazonaws.com/role-arn"
ANNOTATION_CONFIG_HASH: Final = f"{GROUP}/config-hash"
# On a server's pod template: the cluster's pod defaults the run was rendered with (JSON), so
# that a Running run keeps them when the chart's runDefaults change.
ANNOTATION_POD_DEFAULTS: Final = f"{GROUP}/pod-defaults"

# Ports of the server pod.
FLEET_PORT: Final = 9092
STATUS_PORT: Final = 9100
FLEET_PORT_NAME: Final = "fleet"
STATUS_PORT_NAME: Final = "status"
HEALTH_PATH: Final = "/healthz"

# Mount paths inside every fedrun pod.
CONFIG_DIR: Final = "/etc/fedrun"
CONFIG_FILE: Final = "config.json"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE}"
STATE_DIR: Final = "/var/lib/fedrun"
TMP_DIR: Final = "/tmp"
# A run's TLS and node-key Secret is mounted here: `<run>-server-tls` in the server pod,
# `<run>-<hospital>-auth` in that hospital's pod (file names: CA_FILE and the others below).
SECRETS_DIR: Final = "/var/run/secrets/fedrun"
SECRETS_VOLUME: Final = "tls"
# The server's checkpoint volume (spec.server.checkpointVolume: PersistentVolumeClaim
# `<run>-checkpoint`) is mounted here; without one the checkpoint is under STATE_DIR.
CHECKPOINT_DIR: Final = "/var/lib/fedrun-checkpoint"
CHECKPOINT_VOLUME: Final = "checkpoint"
CHECKPOINT_SUFFIX: Final = "-checkpoint"
# A hospital's pvc://<claim>/<path> data is mounted at <PVC_MOUNT_ROOT>/<claim>.
PVC_MOUNT_ROOT: Final = "/data"

# Pod identity: the trainer image runs as this unprivileged user.
RUN_AS_USER: Final = 10001

# Defaults a FederatedRun may leave out.
DEFAULT_IMAGE: Final = "ghcr.io/fedrun/trainer:0.1.0"
DEFAULT_NAMESPACE: Final = "default"
JOB_BACKOFF_LIMIT: Final = 3

# Kubernetes name limits: child names `<run>-<hospital>` must be DNS-1123 labels.
MAX_LABEL_LENGTH: Final = 63
SERVER_SUFFIX: Final = "-server"
CONFIG_SUFFIX: Final = "-config"

# Namespace of the operator when nobody says otherwise: the release namespace docs/install.md
# installs the chart into. The operator itself renders with the namespace it runs in (the
# chart sets FEDRUN_OPERATOR_NAMESPACE from the pod's metadata.namespace); `fedrun render`
# and the local runner use this unless told otherwise.
DEFAULT_OPERATOR_NAMESPACE: Final = "fedrun-system"

_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def namespace_name(value: str) -> str:
    """`value` if it is a Kubernetes namespace name (an RFC 1123 label), else ValueError."""
    if not _NAMESPACE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a namespace name (lowercase RFC 1123 label)")
    return value


# File names inside a run's Secrets, and so inside the pods' mounted directories: the
# server's `<run>-server-tls` holds the CA, its certificate and key, and one public node key
# per hospital; each hospital's `<run>-<hospital>-auth` holds the CA and its node key pair.
CA_FILE: Final = "ca.crt"
TLS_CERT_FILE: Final = "tls.crt"
TLS_KEY_FILE: Final = "tls.key"
NODE_KEY_FILE: Final = "node.key"
NODE_PUB_FILE: Final = "node.pub"


def hospital_pub_file(hospital: str) -> str:
    """Key of a hospital's public node key in the server's Secret: `<hospital>.pub`."""
    return f"{hospital}.pub"


# Environment every pod's container gets: the run, and in a hospital's pod the hospital.
# Log lines carry them (fedrun_core.logs).
ENV_RUN: Final = "FEDRUN_RUN"
ENV_HOSPITAL: Final = "FEDRUN_HOSPITAL"

# Where a hospital's container writes why it failed (its terminationMessagePath).
TERMINATION_LOG: Final = "/dev/termination-log"

# What fedrun itself puts into every run pod, which a run's pod settings (spec.server,
# spec.hospitalDefaults, spec.hospitals[]) cannot take over: every FEDRUN_* variable and the
# others of its environment, its volumes' names, the paths it mounts (nothing may be mounted
# at, under or above one), and its labels (these and every fedrun.io/ key) and annotations
# (every fedrun.io/ key).
ENV_PREFIX: Final = "FEDRUN_"
POD_ENV: Final = (
    "FLWR_TELEMETRY_ENABLED",
    "FLWR_DISABLE_UPDATE_CHECK",
    "MLFLOW_DISABLE_TELEMETRY",
    "HOME",
)
POD_VOLUMES: Final = ("config", "state", "tmp", SECRETS_VOLUME, "data", "ledger", CHECKPOINT_VOLUME)
POD_MOUNT_PATHS: Final = (
    CONFIG_DIR,
    STATE_DIR,
    CHECKPOINT_DIR,
    TMP_DIR,
    SECRETS_DIR,
    PVC_MOUNT_ROOT,
    TERMINATION_LOG,
)
POD_LABELS: Final = (LABEL_PART_OF, LABEL_MANAGED_BY)
RESERVED_KEY_PREFIX: Final = f"{GROUP}/"

# Annotation on a run's Secrets: when their certificates expire (RFC 3339).
ANNOTATION_NOT_AFTER: Final = f"{GROUP}/not-after"
