#!/usr/bin/env bash
# Lint every .proto under protos/cryostack/ with buf's STANDARD rules (configuration: protos/buf.yaml).
#
# buf comes from npm (@bufbuild/buf, pinned in protos/package.json) into the git-ignored protos/node_modules,
# installed on first use; after that linting needs no network. protoc (grpcio-tools) resolves the imports,
# including google/rpc/status.proto from googleapis-common-protos, into a descriptor set that buf lints, so buf
# needs no remote dependencies. PYTHON overrides the interpreter (default: the workspace's, via uv).
set -euo pipefail

protos_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
buf="$protos_dir/node_modules/.bin/buf"
if [[ ! -x "$buf" ]]; then
  npm install --prefix "$protos_dir" --no-audit --no-fund --loglevel=error >&2
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
if [[ -n "${PYTHON:-}" ]]; then
  "$PYTHON" "$protos_dir/generate.py" --descriptor-set "$workdir/image.binpb"
else
  (cd "$protos_dir/.." && uv run --frozen python protos/generate.py --descriptor-set "$workdir/image.binpb")
fi
# Only our files are linted; the imported google/* files follow Google's own conventions.
"$buf" lint "$workdir/image.binpb" --config "$protos_dir/buf.yaml" --path cryostack
echo "buf lint: OK"
