#!/bin/sh
# Builds the OCI image archive of `make image` with no container engine: the release
# binary, the shared libraries `ldd` lists for it (at their host paths, links followed),
# /etc/passwd and /etc/group, with the labels, user and entrypoint of
# deploy/image/Containerfile (read from it, so both builds stay identical).
# Usage: deploy/image/build.sh BINARY VERSION REF OUT   (OCIIMAGE: default tools/bin/ociimage)
set -eu
bin=${1:?binary}; version=${2:?version}; ref=${3:?image reference}; out=${4:?output archive}
here=$(cd "$(dirname "$0")" && pwd)
ociimage=${OCIIMAGE:-$here/../../tools/bin/ociimage}
containerfile=$here/Containerfile

set -- -o "$out" -ref "$ref" -file "$bin=/usr/bin/gpu-dra" \
  -file "$here/passwd=/etc/passwd" -file "$here/group=/etc/group"
libs=$(ldd "$bin" | grep -o '/[^ ]*') || { echo "build.sh: ldd $bin found no libraries" >&2; exit 1; }
for lib in $libs; do set -- "$@" -file "$lib"; done
# LABEL k="v" lines (${VERSION} substituted), USER and the exec-form ENTRYPOINT.
while IFS= read -r line; do
  case $line in
    'LABEL '*) kv=${line#LABEL }; k=${kv%%=*}; v=${kv#*=}; v=${v#\"}; v=${v%\"}
               [ "$v" = '${VERSION}' ] && v=$version
               set -- "$@" -label "$k=$v" ;;
    'USER '*) set -- "$@" -user "${line#USER }" ;;
    'ENTRYPOINT '*) e=${line#ENTRYPOINT \[\"}; set -- "$@" -entrypoint "${e%\"\]}" ;;
  esac
done < "$containerfile"
mkdir -p "$(dirname "$out")"
"$ociimage" "$@"
echo "image $ref: $out ($(wc -c < "$out") bytes)"
