#!/bin/sh
# Renders the plain manifests deploy/*.yaml from the Helm chart deploy/helm/gpu-dra with
# deploy/helm/manifests-values.yaml: one file per chart template. `make deploy-manifests`
# writes them into deploy/; tests/deploy_chart.rs renders into a temp dir and fails when
# the committed files differ.
# Usage: deploy/render-manifests.sh OUTDIR   (HELM: helm binary, default tools/bin/helm)
set -eu
out=${1:?usage: render-manifests.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
helm=${HELM:-$root/tools/bin/helm}
mkdir -p "$out"
for name in namespace rbac node-isolation deviceclasses daemonset webhook; do
  {
    echo "# Rendered from deploy/helm/gpu-dra by \`make deploy-manifests\`: edit the chart, not this file."
    "$helm" template gpu-dra "$root/deploy/helm/gpu-dra" --namespace gpu-dra \
      --values "$root/deploy/helm/manifests-values.yaml" \
      --show-only "templates/$name.yaml"
  } > "$out/$name.yaml.tmp"
  mv "$out/$name.yaml.tmp" "$out/$name.yaml"
done
