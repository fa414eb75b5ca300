#!/usr/bin/env bash
# `make images`: build fedrun's two images with Docker, by default under the names and the
# tag the chart installs (docs/install.md), so a cluster that has them loaded needs no
# image values; the release workflow (.github/workflows/release.yml) pushes these builds.
#   $OPERATOR_IMAGE:$IMAGE_TAG  from Dockerfile.operator (fedrun[operator], no torch)
#   $TRAINER_IMAGE:$IMAGE_TAG   from Dockerfile.trainer  (fedrun[trainer], CPU torch)
# Defaults: ghcr.io/fedrun/operator and ghcr.io/fedrun/trainer (the chart's image.repository
# and the CRD's spec.image default), tagged with the chart's appVersion.
# Without a Docker engine it prints why and exits 0 (this project's CI machines have
# none); a build that fails exits non-zero. docs/images.md describes the variables.
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER=${DOCKER:-docker}
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/fedrun/Chart.yaml)
IMAGE_TAG=${IMAGE_TAG:-$app_version}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/fedrun/operator}
TRAINER_IMAGE=${TRAINER_IMAGE:-ghcr.io/fedrun/trainer}
if [[ -z "$IMAGE_TAG" ]]; then
  echo "make images: error: no IMAGE_TAG and no appVersion in charts/fedrun/Chart.yaml" >&2
  exit 1
fi
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  echo "make images: skipped: no '$DOCKER' command on PATH; building the images needs Docker (docs/images.md)"
  exit 0
fi
if ! engine_error=$("$DOCKER" info 2>&1 >/dev/null); then
  echo "make images: skipped: '$DOCKER' cannot reach a Docker engine: ${engine_error##*$'\n'}"
  exit 0
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
common=(--build-arg "VERSION=${version:-unknown}" --build-arg "REVISION=$revision")
# The repository the images are built from (OCI label org.opencontainers.image.source).
if [[ -n "${SOURCE_URL:-}" ]]; then common+=(--build-arg "SOURCE_URL=$SOURCE_URL"); fi

echo "make images: building $OPERATOR_IMAGE:$IMAGE_TAG"
"$DOCKER" build -f Dockerfile.operator -t "$OPERATOR_IMAGE:$IMAGE_TAG" "${common[@]}" .

if [[ -z "$TORCH_INDEX_URL" ]]; then
  echo "make images: note: TORCH_INDEX_URL is empty, so torch comes from pip's default index," \
    "which may be a CUDA build of several GB; set it to PyTorch's CPU-only wheel index" \
    "(docs/images.md)" >&2
fi
echo "make images: building $TRAINER_IMAGE:$IMAGE_TAG"
"$DOCKER" build -f Dockerfile.trainer -t "$TRAINER_IMAGE:$IMAGE_TAG" "${common[@]}" \
  --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" .

echo "make images: built $OPERATOR_IMAGE:$IMAGE_TAG and $TRAINER_IMAGE:$IMAGE_TAG"
