#!/usr/bin/env bash
# `make e2e-kind`: the demo run on a real Kubernetes cluster, on a machine with Docker.
#
#   1. build the images (tests/kind/images.sh) and load them into a new kind cluster;
#   2. create the runs' namespace ($NAMESPACE), then `helm install` charts/fedrun with
#      those images and watchNamespaces={$NAMESPACE}: the chart's operator follows runs
#      only in the namespaces it is given (RoleBindings there, which need them to exist);
#   3. seed the PersistentVolumeClaim fedrun-demo-data with SYNTHETIC hospital tables
#      (tests/kind/demo-data.yaml: a Job running `fedrun demo-data`);
#   4. apply examples/federatedrun-local-cluster.yaml and wait for phase Succeeded;
#   5. print `kubectl get federatedruns`, then delete the cluster (KEEP_CLUSTER=1 keeps it).
#
# Where Docker or kind is missing it prints why and exits 0: this project's CI machines
# have no Docker engine. Variables (defaults in brackets), see docs/images.md:
#   KIND_CLUSTER [fedrun-e2e]  KIND_NODE_IMAGE []  KEEP_CLUSTER [0]  SKIP_BUILD [0]
#   NAMESPACE [fedrun-demo]  RELEASE_NAMESPACE [fedrun-system]  E2E_TIMEOUT [1200] seconds
#   POLL_SECONDS [5] between looks at the run's status
#   IMAGE_TAG [dev]  OPERATOR_IMAGE [fedrun-operator]  TRAINER_IMAGE [fedrun-trainer]
#   TORCH_INDEX_URL (for the trainer build)  DOCKER [docker]  KIND [kind]  KUBECTL [kubectl]
#   HELM [.tools/bin/helm when present, else helm]
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER=${DOCKER:-docker}
KIND=${KIND:-kind}
KUBECTL=${KUBECTL:-kubectl}
if [[ -z "${HELM:-}" ]]; then
  if [[ -x .tools/bin/helm ]]; then HELM=.tools/bin/helm; else HELM=helm; fi
fi
CLUSTER=${KIND_CLUSTER:-fedrun-e2e}
NAMESPACE=${NAMESPACE:-fedrun-demo}
RELEASE_NAMESPACE=${RELEASE_NAMESPACE:-fedrun-system}
TIMEOUT=${E2E_TIMEOUT:-1200}
POLL_SECONDS=${POLL_SECONDS:-5}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
IMAGE_TAG=${IMAGE_TAG:-dev}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-fedrun-operator}
TRAINER_IMAGE=${TRAINER_IMAGE:-fedrun-trainer}
export DOCKER IMAGE_TAG OPERATOR_IMAGE TRAINER_IMAGE

RUN_FILE=examples/federatedrun-local-cluster.yaml
DATA_FILE=tests/kind/demo-data.yaml
RUN_NAME=stroke-kind
# The image both files name; replaced when IMAGE_TAG or TRAINER_IMAGE say otherwise.
FILE_IMAGE=fedrun-trainer:dev

say() { echo "e2e-kind: $*"; }
skip() {
  echo "make e2e-kind: skipped: $*"
  exit 0
}
die() {
  echo "e2e-kind: error: $*" >&2
  exit 1
}

# --------------------------------------------------------------------------- prerequisites
command -v "$DOCKER" >/dev/null 2>&1 ||
  skip "no '$DOCKER' command on PATH; the kind end-to-end test needs Docker, kind, kubectl and helm (docs/images.md)"
if ! engine_error=$("$DOCKER" info 2>&1 >/dev/null); then
  skip "'$DOCKER' cannot reach a Docker engine: ${engine_error##*$'\n'}"
fi
command -v "$KIND" >/dev/null 2>&1 ||
  skip "no '$KIND' command on PATH; install kind (v0.23 or newer: the chart needs Kubernetes 1.30+)"
command -v "$KUBECTL" >/dev/null 2>&1 || die "no '$KUBECTL' command on PATH; install kubectl"
command -v "$HELM" >/dev/null 2>&1 || die "no '$HELM' command; install helm 3 or run 'make tools'"

# --------------------------------------------------------------------------- images
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  tests/kind/images.sh
fi
OPERATOR_REF="$OPERATOR_IMAGE:$IMAGE_TAG"
TRAINER_REF="$TRAINER_IMAGE:$IMAGE_TAG"
for ref in "$OPERATOR_REF" "$TRAINER_REF"; do
  "$DOCKER" image inspect "$ref" >/dev/null 2>&1 || die "image $ref not found (run 'make images')"
done

# --------------------------------------------------------------------------- cluster
WORK=$(mktemp -d)
# A kubeconfig of our own: the user's ~/.kube/config and current context stay untouched.
export KUBECONFIG="$WORK/kubeconfig"
created=0

diagnose() {
  say "diagnostics follow"
  "$KUBECTL" get federatedruns,deployments,jobs,pods,pvc -A -o wide || true
  "$KUBECTL" -n "$NAMESPACE" get federatedrun "$RUN_NAME" -o yaml || true
  "$KUBECTL" -n "$NAMESPACE" get events --sort-by=.lastTimestamp | tail -n 40 || true
  local ns pod
  for ns in "$RELEASE_NAMESPACE" "$NAMESPACE"; do
    for pod in $("$KUBECTL" -n "$ns" get pods -o name 2>/dev/null); do
      say "--- logs of $ns/$pod"
      "$KUBECTL" -n "$ns" logs "$pod" --all-containers --tail=60 || true
    done
  done
}

cleanup() {
  local code=$?
  if [[ $code -ne 0 ]]; then diagnose; fi
  if [[ $created == 1 && "$KEEP_CLUSTER" != 1 ]]; then
    say "deleting kind cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  elif [[ $created == 1 ]]; then
    say "kept kind cluster $CLUSTER: kind get kubeconfig --name $CLUSTER > kubeconfig"
  fi
  rm -rf "$WORK"
  exit "$code"
}
trap cleanup EXIT
# Interrupted is failed: the clean-up must not report success.
trap 'exit 130' INT
trap 'exit 143' TERM

if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  # Someone else's cluster: use it, never delete it.
  say "using the existing kind cluster $CLUSTER"
  "$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
  say "creating kind cluster $CLUSTER"
  created=1
  node_image=()
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then node_image=(--image "$KIND_NODE_IMAGE"); fi
  # ${a[@]+...}: an empty array under `set -u` in the bash 3.2 macOS ships.
  "$KIND" create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s \
    ${node_image[@]+"${node_image[@]}"}
fi
say "loading $OPERATOR_REF and $TRAINER_REF into the cluster"
"$KIND" load docker-image --name "$CLUSTER" "$OPERATOR_REF" "$TRAINER_REF"

# --------------------------------------------------------------------------- operator
# The runs' namespace first: the chart binds the operator's rules there (a RoleBinding),
# and the operator follows runs only in the namespaces watchNamespaces names.
"$KUBECTL" create namespace "$NAMESPACE" --dry-run=client -o yaml | "$KUBECTL" apply -f -
say "installing charts/fedrun into $RELEASE_NAMESPACE, following runs in $NAMESPACE"
"$HELM" upgrade --install fedrun charts/fedrun \
  --namespace "$RELEASE_NAMESPACE" --create-namespace \
  --set image.repository="$OPERATOR_IMAGE" --set image.tag="$IMAGE_TAG" \
  --set "watchNamespaces={$NAMESPACE}" \
  --wait --timeout 5m
"$KUBECTL" wait --for=condition=Established crd/federatedruns.fedrun.io --timeout=60s

# --------------------------------------------------------------------------- data
say "seeding PersistentVolumeClaim fedrun-demo-data in $NAMESPACE"
sed "s|image: $FILE_IMAGE|image: $TRAINER_REF|" "$DATA_FILE" >"$WORK/demo-data.yaml"
"$KUBECTL" -n "$NAMESPACE" apply -f "$WORK/demo-data.yaml"
"$KUBECTL" -n "$NAMESPACE" wait --for=condition=complete job/fedrun-demo-data --timeout=300s

# --------------------------------------------------------------------------- the run
say "applying $RUN_FILE"
sed "s|image: $FILE_IMAGE|image: $TRAINER_REF|" "$RUN_FILE" >"$WORK/run.yaml"
"$KUBECTL" -n "$NAMESPACE" apply -f "$WORK/run.yaml"

say "waiting up to ${TIMEOUT}s for $RUN_NAME to succeed"
deadline=$((SECONDS + TIMEOUT))
last=""
while :; do
  phase=$("$KUBECTL" -n "$NAMESPACE" get federatedrun "$RUN_NAME" -o jsonpath='{.status.phase}' \
    2>/dev/null || true)
  line=$("$KUBECTL" -n "$NAMESPACE" get federatedrun "$RUN_NAME" --no-headers 2>/dev/null || true)
  if [[ "$line" != "$last" ]]; then
    say "$line"
    last=$line
  fi
  case "$phase" in
    Succeeded) break ;;
    Failed | BudgetExhausted)
      die "$RUN_NAME ended $phase: $("$KUBECTL" -n "$NAMESPACE" get federatedrun "$RUN_NAME" -o jsonpath='{.status.message}')"
      ;;
  esac
  ((SECONDS < deadline)) || die "$RUN_NAME did not succeed within ${TIMEOUT}s (phase: ${phase:-none})"
  sleep "$POLL_SECONDS"
done

"$KUBECTL" get federatedruns -n "$NAMESPACE"
say "passed: $RUN_NAME Succeeded on kind"
