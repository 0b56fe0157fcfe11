#!/bin/sh
# Builds the OCI image archive of `make image` with no container engine: the release
# binary, the programs of deploy/image/programs (setsid, systemd-run, unshare, mount, sh:
# MPS daemon launchers) at their host paths, the shared libraries `ldd` lists for all of
# them (at their host paths, links followed), glibc's libpthread, libdl and librt (which
# the driver's nvidia-smi and nvidia-cuda-mps-control link; the plugin runs them in its
# container), /etc/passwd and /etc/group, with the labels, user and entrypoint of
# deploy/image/Containerfile (read from it, so both builds stay identical).
# Usage: deploy/image/build.sh BINARY VERSION REF OUT   (OCIIMAGE: default tools/bin/ociimage)
set -eu
bin=${1:?binary}; version=${2:?version}; ref=${3:?image reference}; out=${4:?output archive}
here=$(cd "$(dirname "$0")" && pwd)
ociimage=${OCIIMAGE:-$here/../../tools/bin/ociimage}
containerfile=$here/Containerfile

set -- -o "$out" -ref "$ref" -file "$bin=/usr/bin/gpu-dra" \
  -file "$here/passwd=/etc/passwd" -file "$here/group=/etc/group"
programs=$(sed -e 's/#.*//' "$here/programs" | grep -o '/[^ ]*')
files=
for p in "$bin" $programs; do
  [ -x "$p" ] || { echo "build.sh: $p missing: install it (make debs)" >&2; exit 1; }
  libs=$(ldd "$p" | grep -o '/[^ ]*') || { echo "build.sh: ldd $p found no libraries" >&2; exit 1; }
  files="$files $libs"
done
libc_dir=$(dirname "$(ldd "$bin" | grep -o '/[^ ]*/libc\.so\.6')")
for lib in libpthread.so.0 libdl.so.2 librt.so.1; do files="$files $libc_dir/$lib"; done
for p in $programs; do set -- "$@" -file "$p"; done
for lib in $(printf '%s\n' $files | sort -u); do set -- "$@" -file "$lib"; done
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
