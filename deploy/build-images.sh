#!/usr/bin/env bash
# Builds shoal's container images without any registry: each image is one locally built
# binary plus the shared libraries `ldd` says it needs, on an empty base (FROM scratch).
#
#   shoal/shoal           the shoal binary (roles control, host, gateway; the CLI)
#   shoal/nats            nats-server (from $SHOAL_NATS_SERVER or .tools/nats-*/bin; scripts/setup.sh installs it)
#   shoal/example-worker  the Rust example worker (examples/rust-worker), a RunPod-protocol worker
#
# Usage: deploy/build-images.sh [--profile release|dev] [--bin-dir DIR] [--tag TAG] [shoal|nats|worker ...]
#   --profile  cargo profile the binaries are built with (default: release)
#   --bin-dir  take shoal and shoal-example-worker from DIR instead of building them
#   --tag      the tag every image gets (default: local)
# Each image is also tagged with a hash of its content (`h-<12 hex>`); when an image of the same
# content exists it is only re-tagged, not rebuilt. Prints one line per image: `<name> <image:h-tag>`.
# Users with a registry build the conventional way instead: see deploy/README.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=release
bin_dir=""
tag=local
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    shoal|nats|worker) images+=("$1"); shift ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(shoal nats worker)
command -v docker >/dev/null || { echo "error: docker not found" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: the Docker engine does not answer (docker info failed)" >&2; exit 1; }

wants() { local i; for i in "${images[@]}"; do [ "$i" = "$1" ] && return 0; done; return 1; }

if [ -z "$bin_dir" ] && { wants shoal || wants worker; }; then
  target="${CARGO_TARGET_DIR:-$root/target}"
  packages=()
  wants shoal && packages+=(-p shoal)
  wants worker && packages+=(-p shoal-example-worker)
  echo "build-images: cargo build --profile $profile ${packages[*]}" >&2
  (cd "$root" && cargo build --profile "$profile" "${packages[@]}" >&2)
  case "$profile" in dev) bin_dir="$target/debug" ;; *) bin_dir="$target/$profile" ;; esac
fi

nats_bin() {
  if [ -n "${SHOAL_NATS_SERVER:-}" ]; then echo "$SHOAL_NATS_SERVER"; return; fi
  local tools="${SHOAL_TOOLS:-$root/.tools}" found
  found="$(ls -d "$tools"/nats-*/bin/nats-server 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$found" ] || { echo "error: no nats-server in $tools (run scripts/setup.sh, or set SHOAL_NATS_SERVER)" >&2; exit 1; }
  echo "$found"
}

# One image at a time on this machine: concurrent test runs share the engine.
lock="${TMPDIR:-/tmp}/shoal-build-images.lock"
exec 9>"$lock"
flock 9

# build_image NAME BINARY ENTRY [ENV...]: NAME's image with BINARY at /usr/local/bin/ENTRY.
build_image() {
  local name="$1" binary="$2" entry="$3"; shift 3
  [ -x "$binary" ] || { echo "error: $binary is missing or not executable" >&2; exit 1; }
  local ctx; ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"' RETURN
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc" "$ctx/rootfs/var/lib/shoal"
  chmod 1777 "$ctx/rootfs/tmp"
  cp "$binary" "$ctx/rootfs/usr/local/bin/$entry"
  # the shared libraries it needs (none for a static binary), at the paths ldd reports
  local lib
  for lib in $(ldd "$binary" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
    cp -L --parents "$lib" "$ctx/rootfs/"
  done
  printf 'root:x:0:0:root:/:/usr/local/bin/%s\nnobody:x:65534:65534:nobody:/:/usr/local/bin/%s\n' "$entry" "$entry" >"$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
  {
    echo "FROM scratch"
    echo "COPY rootfs/ /"
    local e; for e in "$@"; do echo "ENV $e"; done
    echo "ENTRYPOINT [\"/usr/local/bin/$entry\"]"
  } >"$ctx/Dockerfile"
  local hash
  hash="$( (cd "$ctx" && find rootfs -type f -print0 | sort -z | xargs -0 sha256sum && cat Dockerfile) | sha256sum | cut -c1-12)"
  local image="shoal/$name:h-$hash"
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "build-images: building $image" >&2
    printf 'LABEL io.shoal.content-hash="%s"\n' "$hash" >>"$ctx/Dockerfile"
    local out
    if ! out="$(DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" 2>&1)"; then
      echo "$out" >&2
      exit 1
    fi
  fi
  docker tag "$image" "shoal/$name:$tag"
  # keep the three newest content tags of this image; older ones only fill the disk
  local old
  for old in $(docker images "shoal/$name" --format '{{.Tag}}' | { grep '^h-' || true; } | { grep -vx "h-$hash" || true; } | tail -n +3); do
    docker rmi "shoal/$name:$old" >/dev/null 2>&1 || true
  done
  echo "$name $image"
}

wants shoal && build_image shoal "$bin_dir/shoal" shoal \
  "LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/lib" "SHOAL_HOST__STATE_DIR=/var/lib/shoal"
wants nats && build_image nats "$(nats_bin)" nats-server
wants worker && build_image example-worker "$bin_dir/shoal-example-worker" shoal-example-worker
exit 0
