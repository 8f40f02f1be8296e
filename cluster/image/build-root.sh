#!/usr/bin/env bash
# Assembles the root filesystem of the dalle-rs container image: `dalle` and
# `dalle-sample`, and the exact set of shared libraries they load, nothing
# else (no shell, no package manager). cluster/image/Dockerfile copies it
# into a `FROM scratch` image:
#
#   cluster/image/build-root.sh cluster/image/root && docker build -t dalle-rs cluster/image
#
# Usage: build-root.sh OUT_DIR [--binaries DIR] [--lib FILE]...
#
#   OUT_DIR          the root to write; an existing one made by this script is
#                    replaced (anything else there is refused)
#   --binaries DIR   where `dalle` and `dalle-sample` are (default
#                    target/release, falling back to target/debug)
#   --lib FILE       one more library to ship, with its dependencies
#                    (repeatable); it lands at its host path
#
# What goes in:
#   * the binaries, in /usr/local/bin;
#   * every library `ldd` resolves for them: glibc and its loader, libstdc++,
#     libgcc_s, at the paths the host has them (so the loader, copied from the
#     host, finds them on its built-in search path), and libtorch with the CUDA
#     libraries of its PyPI wheel;
#   * the libraries loaded with dlopen(), which ldd cannot see (DLOPENED
#     below): libtorch's lazily loaded linear algebra and NVRTC, cuDNN's
#     sub-libraries, and NCCL, which our code (cudarc) opens as `libnccl.so`,
#     a name PyPI's wheel does not ship: a `libnccl.so -> libnccl.so.2`
#     symlink next to it, on the loader path, is what
#     crates/collective/src/nccl.rs `expose_libnccl` makes for workers
#     outside the image;
#   * /etc/ssl/certs/ca-certificates.crt (S3 over https), a minimal
#     /etc/passwd, /etc/group and /etc/nsswitch.conf, /tmp, and empty /dev,
#     /proc and /sys for the runtime to mount.
#
# NOT copied: the CUDA driver, libcuda.so.1 and libnvidia-ml.so.1. They must
# match the host's kernel module, so the NVIDIA container toolkit (or the CDI
# spec of the cluster) mounts the host's into the container at run time
# (under /usr/lib/x86_64-linux-gnu or /usr/lib64, then refreshes
# /etc/ld.so.cache). Without them the image runs on CPUs.
#
# Not included either: rdma-core. NCCL between nodes uses TCP sockets in
# this image; InfiniBand would need libibverbs (--lib), its provider plugins
# (…/libibverbs/*.so) and /etc/libibverbs.d as well.
#
# Where the wheel's libraries go, and why: the binaries' RUNPATH names the
# build machine's cache (~/.cache/dalle-rs/torch-…/site-packages/torch/lib),
# a path that says nothing about the image. The wheel's site-packages is
# placed at /opt/dalle instead (torch/lib → /opt/dalle/torch/lib,
# nvidia/X/lib → /opt/dalle/nvidia/X/lib), which keeps the wheel's own
# relative RPATHs ($ORIGIN/../../nvidia/cu13/lib …) valid, and the loader
# finds them two independent ways: /etc/ld.so.cache, generated here from
# /etc/ld.so.conf.d/dalle.conf (works with an empty environment, and survives
# the container toolkit's ldconfig, which reads that conf), and the
# Dockerfile's LD_LIBRARY_PATH (works even where a runtime replaces the
# cache). The stale RUNPATH stays: a directory that does not exist is
# skipped. No binary is modified (no patchelf), so files can be hard-linked.
#
# Files are hard-linked from the build and the wheel when OUT_DIR is on the
# same file system (the root is over 3 GB), copied otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { printf '[build-root] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '/^# Usage:/,/^# What goes in/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

out="" bins="" extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --binaries) [ $# -ge 2 ] || usage; bins=$2; shift 2 ;;
    --binaries=*) bins=${1#*=}; shift ;;
    --lib) [ $# -ge 2 ] || usage; extra+=("$2"); shift 2 ;;
    --lib=*) extra+=("${1#*=}"); shift ;;
    -h|--help) usage ;;
    -*) log "unknown option $1"; usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage
for tool in ldd ldconfig readelf; do
  command -v "$tool" >/dev/null || die "$tool is needed (binutils, libc-bin)"
done

if [ -z "$bins" ]; then
  bins=$repo/target/release
  if [ ! -x "$bins/dalle" ]; then
    log "no release build in $bins, using target/debug (cargo build --release for the image)"
    bins=$repo/target/debug
  fi
fi
binaries=("$bins/dalle" "$bins/dalle-sample")
for b in "${binaries[@]}"; do
  [ -x "$b" ] || die "$b is missing (cargo build --release -p dalle-cli -p dalle-sample)"
done

# The image's layout of the wheel, and the names of what is dlopen()ed,
# relative to site-packages (globs).
PREFIX=/opt/dalle
DLOPENED=(
  torch/lib/libtorch_cuda_linalg.so        # cuSOLVER/MAGMA ops, loaded on first use
  torch/lib/libcaffe2_nvrtc.so             # NVRTC (fused kernels)
  nvidia/cu13/lib/libnvrtc.so.*            # … and what it and cuBLASLt open
  nvidia/cu13/lib/libnvrtc-builtins.so.*
  nvidia/cudnn/lib/libcudnn_*.so.*         # cuDNN 9 opens its sub-libraries
  nvidia/nccl/lib/libnccl.so.2             # opened by cudarc as libnccl.so
)
# Host libraries that may stay unresolved: the driver's (see above).
DRIVER='^(libcuda\.so\.1|libnvidia-ml\.so\.1)$'

# --- OUT_DIR ---------------------------------------------------------------
marker=.dalle-image-root
if [ -e "$out" ]; then
  if [ -e "$out/$marker" ]; then
    rm -rf "$out"
  elif [ -d "$out" ] && [ -z "$(ls -A "$out")" ]; then
    rmdir "$out"
  else
    die "$out exists and was not made by this script: remove it first"
  fi
fi
mkdir -p "$out"
root=$(cd "$out" && pwd)
touch "$root/$marker"

# Hard link when possible, else copy. Never modifies the source.
put() { # SRC DEST(host path)
  mkdir -p "$(dirname "$2")"
  [ -e "$2" ] || [ -L "$2" ] && return 0
  ln "$1" "$2" 2>/dev/null || cp --preserve=mode,timestamps "$1" "$2"
}

# A symlink at image path L to T as the host has it, made relative when T is
# absolute so that it resolves inside the root from the outside, too.
link() { # T L
  local t=$1
  case $t in /*) t=$(realpath -sm --relative-to="$(realpath -e "$(dirname "$2")")" "$t") ;; esac
  ln -s "$t" "$root$2"
}

# Creates directory D of the image the way the host has it: a component that
# is a symlink on the host (/lib -> usr/lib on merged-/usr systems) is the
# same symlink in the image.
mirror_dir() { # D (absolute, normalized)
  local d=$1
  [ "$d" = / ] && return 0
  if [ -e "$root$d" ] || [ -L "$root$d" ]; then return 0; fi
  mirror_dir "$(dirname "$d")"
  if [ -L "$d" ]; then
    local t
    t=$(readlink "$d")
    link "$t" "$d"
    case $t in /*) ;; *) t=$(dirname "$d")/$t ;; esac
    mirror_dir "$(realpath -sm "$t")"
  else
    mkdir "$root$d"
  fi
}

# A host system library at the same path in the image; symlinks (soname
# links such as libstdc++.so.6 -> libstdc++.so.6.0.30) stay symlinks.
put_system() { # P (absolute)
  local p
  p=$(realpath -sm "$1")
  mirror_dir "$(dirname "$p")"
  if [ -L "$p" ]; then
    local t
    t=$(readlink "$p")
    [ -e "$root$p" ] || [ -L "$root$p" ] || link "$t" "$p"
    case $t in /*) ;; *) t=$(realpath -e "$(dirname "$p")")/$t ;; esac
    put_system "$t"
  else
    # The path as named may cross a directory symlink: place the file at
    # its real location, which mirror_dir made reachable under this name.
    local real
    real=$(realpath -e "$p")
    mirror_dir "$(dirname "$real")"
    put "$real" "$root$real"
  fi
}

# A library of the wheel (under $site) at $PREFIX/<its path in the wheel>.
put_wheel() { # P (absolute)
  local p=$1 dir name rel
  dir=$(realpath -e "$(dirname "$p")")
  name=$(basename "$p")
  rel=${dir#"$site"/}
  if [ -L "$p" ] && t=$(readlink "$p") && [[ $t != */* ]]; then
    mkdir -p "$root$PREFIX/$rel"
    [ -L "$root$PREFIX/$rel/$name" ] || ln -s "$t" "$root$PREFIX/$rel/$name"
    put_wheel "$dir/$t"
  else
    put "$(realpath -e "$p")" "$root$PREFIX/$rel/$name"
  fi
}

# The libraries ldd resolves for FILEs, one absolute path a line; fails on
# any it cannot find but the driver's.
closure() {
  local f missing
  for f in "$@"; do
    ldd "$f" | awk -v f="$f" '
      $2 == "=>" && $3 == "not" { print "MISSING " $1 " (needed by " f ")"; next }
      $2 == "=>" && $3 ~ /^\// { print $3; next }
      $1 ~ /^\// { print $1 }'
  done | sort -u > "$tmp/closure"
  missing=$(grep '^MISSING ' "$tmp/closure" | awk '{print $2}' | grep -Ev "$DRIVER" || true)
  [ -z "$missing" ] || die "unresolved libraries: $(echo $missing)"
  grep -v '^MISSING ' "$tmp/closure"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- libraries ---------------------------------------------------------------
closure "${binaries[@]}" > "$tmp/libs"
torch_cpu=$(grep '/libtorch_cpu\.so$' "$tmp/libs" | head -1) ||
  die "the binaries do not load libtorch_cpu.so: not linked against libtorch?"
site=$(realpath -e "$(dirname "$torch_cpu")/../..")
log "binaries: $bins"
log "libtorch wheel: $site"

seeds=()
shopt -s nullglob
for pattern in "${DLOPENED[@]}"; do
  matched=("$site"/$pattern)
  [ ${#matched[@]} -gt 0 ] || log "warning: nothing matches $site/$pattern (a CPU-only libtorch?)"
  seeds+=("${matched[@]}")
done
shopt -u nullglob
for f in "${extra[@]}"; do
  [ -e "$f" ] || die "--lib $f: no such file"
  seeds+=("$(realpath -s "$f")")
done
{ cat "$tmp/libs"; printf '%s\n' "${seeds[@]}"; [ ${#seeds[@]} -eq 0 ] || closure "${seeds[@]}"; } |
  sort -u > "$tmp/all"

while read -r lib; do
  case $(realpath -e "$lib") in
    "$site"/*) put_wheel "$lib" ;;
    *) put_system "$lib" ;;
  esac
done < "$tmp/all"

# cudarc dlopen()s libnccl.so (see crates/collective/src/nccl.rs).
nccl_dir=$root$PREFIX/nvidia/nccl/lib
if [ -e "$nccl_dir/libnccl.so.2" ]; then
  ln -sfn libnccl.so.2 "$nccl_dir/libnccl.so"
fi

# --- binaries ------------------------------------------------------------------
mkdir -p "$root/usr/local/bin"
for b in "${binaries[@]}"; do
  put "$(realpath -e "$b")" "$root/usr/local/bin/$(basename "$b")"
done

# --- /etc, /tmp and mount points -------------------------------------------------
mkdir -p "$root/etc/ld.so.conf.d" "$root/dev" "$root/proc" "$root/sys" "$root/run" \
  "$root/root" "$root/tmp" "$root/usr/lib64"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
dalle:x:1000:1000:dalle:/tmp:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
dalle:x:1000:
nogroup:x:65534:
EOF
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
certs=/etc/ssl/certs/ca-certificates.crt
if [ -e "$certs" ]; then
  mkdir -p "$root/etc/ssl/certs"
  put "$(realpath -e "$certs")" "$root$certs"
else
  log "warning: no $certs on this machine: S3 over https will fail in the image"
fi

# The loader's library path: every directory of the wheel that got a library,
# and /usr/lib64, where some container toolkits put the driver's libraries.
(cd "$root" && find ".$PREFIX" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | cut -c2- | sort -u) \
  > "$tmp/dirs"
{
  echo "# The libtorch wheel's libraries (cluster/image/build-root.sh)."
  cat "$tmp/dirs"
  echo /usr/lib64
} > "$root/etc/ld.so.conf.d/dalle.conf"
echo 'include /etc/ld.so.conf.d/*.conf' > "$root/etc/ld.so.conf"

# The Dockerfile's LD_LIBRARY_PATH must name the same directories.
ldpath=$(sed -n 's/^ENV LD_LIBRARY_PATH=//p' "$here/Dockerfile")
while read -r d; do
  case ":$ldpath:" in *":$d:"*) ;; *)
    die "$here/Dockerfile: LD_LIBRARY_PATH lacks $d (the wheel's layout changed?)" ;;
  esac
done < "$tmp/dirs"

# /etc/ld.so.cache: ldconfig -r chroots into the root, which takes root
# privileges, or a user namespace where that is allowed.
if [ "$(id -u)" = 0 ]; then
  ldconfig -r "$root"
elif unshare -r true 2>/dev/null; then
  unshare -r ldconfig -r "$root"
else
  log "warning: no /etc/ld.so.cache (ldconfig -r needs root): the image relies on LD_LIBRARY_PATH"
fi

nlibs=$(find "$root" -path "$root/usr/local/bin" -prune -o -type f -name '*.so*' -print | wc -l)
size=$(du -sh "$root" | cut -f1)
log "$root: $nlibs libraries, $size in all (hard links, where they were made, take no space here)"
