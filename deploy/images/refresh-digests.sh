#!/usr/bin/env bash
# Moves the Dockerfile's base images to the digest their tag names today:
#
#   deploy/images/refresh-digests.sh [Dockerfile]
#
# Every `ARG NAME=<image>:<tag>@sha256:<digest>` line is looked up by its tag and rewritten with
# the digest of the tag's multi-platform index, so that one pin serves every platform. Needs
# one of crane, skopeo, or docker with buildx, and access to the registry; prints each change.
# Then rebuild the images and run the tests; commit the new digests on their own.
set -euo pipefail

dockerfile="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/Dockerfile}"

index_digest() { # index_digest <image:tag>: the digest of the manifest (list) the tag names
  if command -v crane >/dev/null; then
    crane digest "$1"
  elif command -v skopeo >/dev/null; then
    # --raw: the manifest list itself, whose sha256 is its digest (not one platform's manifest)
    echo "sha256:$(skopeo inspect --raw "docker://$1" | sha256sum | cut -d' ' -f1)"
  elif docker buildx version >/dev/null 2>&1; then
    docker buildx imagetools inspect "$1" --format '{{.Manifest.Digest}}'
  else
    echo "refresh-digests: needs crane, skopeo or docker buildx" >&2
    return 1
  fi
}

pinned='^ARG ([A-Z_]+)=([^@[:space:]]+)@(sha256:[0-9a-f]{64})$'
found=0
while IFS= read -r line; do
  [[ $line =~ $pinned ]] || continue
  found=$((found + 1))
  name="${BASH_REMATCH[1]}" image="${BASH_REMATCH[2]}" old="${BASH_REMATCH[3]}"
  new="$(index_digest "$image")"
  if [[ ! $new =~ ^sha256:[0-9a-f]{64}$ ]]; then
    echo "refresh-digests: $image: got ${new@Q}, not a sha256 digest" >&2
    exit 1
  fi
  if [[ $new == "$old" ]]; then
    echo "$name: $image unchanged"
    continue
  fi
  sed -i "s|^ARG $name=$image@$old\$|ARG $name=$image@$new|" "$dockerfile"
  echo "$name: $image $old -> $new"
done <"$dockerfile"

if ((found == 0)); then
  echo "refresh-digests: no ARG <name>=<image>:<tag>@sha256:<digest> line in $dockerfile" >&2
  exit 1
fi
