#!/usr/bin/env bash
# Build the tvix-boot guest kernel from Debian's linux-source package.
#
#   boot/guest-kernel/build.sh            build (or reuse the cached build), print the vmlinux path
#
# Recipe: `make tinyconfig`, merge tvix-boot.config with merge_config.sh -m,
# `make olddefconfig`, check every option of the fragment kept its value,
# `make bzImage`; patches/*.patch are applied to the source first. Results are
# cached OUTSIDE the checkout:
#
#   ${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}/kernel/<hash>/
#       vmlinux   stripped ELF (what tvix-boot loads by default)
#       bzImage   the same kernel as a bzImage (for QEMU and the bzImage loader)
#       config    the full .config it was built with
#   .../kernel/current -> <hash>   stable link for tvix-boot to find the kernel
#
# <hash> is the sha256 of the fragment, the patches, the source tarball's name
# and package version, and RECIPE_VERSION below; a cache hit returns at once.
#
# stdout carries exactly one line, the vmlinux path; everything else goes to
# stderr.
#
# Environment:
#   TVIX_BOOT_CACHE         cache root (see above)
#   TVIX_BOOT_LINUX_SOURCE  kernel tarball (default /usr/src/linux-source-6.12.tar.xz)
#   TVIX_BOOT_KEEP_BUILD=1  keep the build tree next to the result (for debugging)
set -euo pipefail

# Bump when the steps below change in a way that changes the output.
RECIPE_VERSION=1
# Debian's linux-source-<series> package the kernel is built from.
LINUX_SERIES=6.12

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/tvix-boot.config"
default_tarball=/usr/src/linux-source-$LINUX_SERIES.tar.xz
source_tarball=${TVIX_BOOT_LINUX_SOURCE:-$default_tarball}
cache_root=${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}
kernel_cache="$cache_root/kernel"

# Keep stdout for the one result line; send everything else to stderr.
exec 3>&1 1>&2

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

[[ -f $fragment ]] || die "config fragment $fragment not found"

# --- Build dependencies -----------------------------------------------------
# Debian package -> a file or command that shows it is installed.
declare -A deps=(
    [linux-source-$LINUX_SERIES]=$default_tarball
    [build-essential]=cmd:gcc
    [make]=cmd:make
    [bc]=cmd:bc
    [flex]=cmd:flex
    [bison]=cmd:bison
    [libelf-dev]=/usr/include/libelf.h
    [libssl-dev]=/usr/include/openssl/ssl.h
    [cpio]=cmd:cpio
    [xz-utils]=cmd:xz
    [patch]=cmd:patch
)
missing=()
for pkg in "${!deps[@]}"; do
    probe=${deps[$pkg]}
    if [[ $probe == cmd:* ]]; then
        command -v "${probe#cmd:}" >/dev/null 2>&1 || missing+=("$pkg")
    else
        # The source package only matters if we use the default tarball.
        if [[ $pkg == linux-source-* && $source_tarball != "$probe" ]]; then continue; fi
        [[ -e $probe ]] || missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "build.sh: installing missing build dependencies: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; } \
            || die "could not install ${missing[*]}"
    else
        die "missing build dependencies: ${missing[*]} (run as root to install them with apt-get)"
    fi
fi
[[ -f $source_tarball ]] || die "kernel source tarball $source_tarball not found"

shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob

# --- Cache key --------------------------------------------------------------
# The package version identifies the tarball's contents without hashing ~130 MB
# on every run; outside Debian fall back to its size and mtime.
source_version=$(dpkg-query -W -f '${Version}' "linux-source-$LINUX_SERIES" 2>/dev/null || true)
if [[ -z $source_version || $source_tarball != "$default_tarball" ]]; then
    source_version=$(stat -c '%s-%Y' "$source_tarball")
fi
hash=$(
    {
        echo "recipe=$RECIPE_VERSION"
        echo "source=$(basename "$source_tarball") $source_version"
        cat "$fragment"
        for p in "${patches[@]}"; do
            echo "patch=$(basename "$p")"
            cat "$p"
        done
    } | sha256sum | cut -d' ' -f1
)
out="$kernel_cache/$hash"

publish_current() {
    # Atomic replace of the link: create aside, then rename over.
    ln -sfn "$hash" "$kernel_cache/current.tmp.$$"
    mv -T "$kernel_cache/current.tmp.$$" "$kernel_cache/current"
}

if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
    publish_current
    echo "$out/vmlinux" >&3
    exit 0
fi

mkdir -p "$kernel_cache"
# Serialise concurrent builds (tests start in parallel): the second caller
# waits, then finds the finished result.
exec 9>"$kernel_cache/.lock"
flock 9
if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
    publish_current
    echo "$out/vmlinux" >&3
    exit 0
fi

# --- Build --------------------------------------------------------------------
start=$(date +%s)
build="$kernel_cache/build-$hash"
rm -rf "$build"
mkdir -p "$build"
cleanup() { [[ ${TVIX_BOOT_KEEP_BUILD:-} == 1 ]] || rm -rf "$build"; }
trap cleanup EXIT

echo "build.sh: building guest kernel $hash from $source_tarball (takes minutes)"
tar -xf "$source_tarball" -C "$build" --strip-components=1
cd "$build"
for p in "${patches[@]}"; do
    echo "build.sh: applying $(basename "$p")"
    patch -p1 --forward --batch <"$p"
done

make tinyconfig
scripts/kconfig/merge_config.sh -m .config "$fragment"
make olddefconfig

# merge_config.sh only warns when Kconfig drops an option (an unmet
# dependency); a kernel silently missing FUSE_DAX or virtio-mmio is worse than
# a failed build, so insist on every value.
bad=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        key=${BASH_REMATCH[1]}
        grep -qxF "$line" .config || {
            echo "build.sh: $key: asked for ${BASH_REMATCH[2]}, got: $(grep -E "^(# )?$key[= ]" .config || echo unset)"
            bad=1
        }
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        key=${BASH_REMATCH[1]}
        if grep -q "^$key=" .config; then
            echo "build.sh: $key: asked to be off, got: $(grep "^$key=" .config)"
            bad=1
        fi
    fi
done <"$fragment"
((bad == 0)) || die "the kernel configuration did not keep the fragment's values (see above)"

make -j"$(nproc)" bzImage

tmp_out="$out.tmp.$$"
rm -rf "$tmp_out"
mkdir -p "$tmp_out"
strip --strip-all -o "$tmp_out/vmlinux" vmlinux
cp arch/x86/boot/bzImage "$tmp_out/bzImage"
cp .config "$tmp_out/config"
rm -rf "$out"
mv -T "$tmp_out" "$out"
if [[ ${TVIX_BOOT_KEEP_BUILD:-} == 1 ]]; then
    echo "build.sh: build tree kept at $build"
fi

publish_current
echo "build.sh: built in $(($(date +%s) - start)) s: vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
echo "$out/vmlinux" >&3
