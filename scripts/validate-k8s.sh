#!/usr/bin/env bash
# Validates deploy/kubernetes against the Kubernetes API schemas of one
# version (kubernetes-validate, from PyPI, in a reused venv). The manifests'
# agreement with the Dockerfile and `serve --help` is tests/deploy.rs's job.
#
#   scripts/validate-k8s.sh            # Kubernetes 1.30
#   K8S_VERSION=1.29 scripts/validate-k8s.sh
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION="${K8S_VERSION:-1.30}"
VENV="${TMPDIR:-/tmp}/gpt-serve-validate-k8s-venv"

if [[ ! -x "$VENV/bin/kubernetes-validate" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi

# kustomization.yaml is kustomize's config, not an API object: no schema.
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done

# --strict: unknown fields (a misspelt key) are errors too.
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "${manifests[@]}"
echo "validate-k8s: ${#manifests[@]} manifests valid for Kubernetes $K8S_VERSION"

# The kustomization too, where a kustomize is at hand: it must build, and
# what it builds (images: applied) must validate.
if command -v kustomize >/dev/null; then
  render=(kustomize build)
elif command -v kubectl >/dev/null; then
  render=(kubectl kustomize)
else
  echo "validate-k8s: no kustomize or kubectl here, kustomization.yaml not built"
  exit 0
fi
built="$(mktemp "${TMPDIR:-/tmp}/gpt-serve-kustomized.XXXXXX.yaml")"
trap 'rm -f "$built"' EXIT
"${render[@]}" deploy/kubernetes >"$built"
"$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$K8S_VERSION" "$built"
echo "validate-k8s: ${render[*]} deploy/kubernetes builds and validates"
