#!/bin/bash
# nix-build builder (sandbox off): turns programs from this Debian machine into
# Nix-style store paths, the way nixpkgs' autoPatchelfHook packages prebuilt
# binaries. There is no nixpkgs here, so this is how the tests get dynamically
# linked closures (systemd, CPython) that run from /nix/store alone.
#
#   debian-closure.sh glibc
#       $out/lib: the dynamic loader and every library of Debian's libc6.
#   debian-closure.sh programs GLIBC SRC:DEST...
#       copies each SRC (a file or a directory) to $out/DEST, then every library
#       the ELF files under $out need (as ldd resolves them here, glibc's own
#       excepted) into $out/lib, and patches them all: interpreter
#       GLIBC/lib/ld-linux-x86-64.so.2, RUNPATH $out/lib:GLIBC/lib. Nix then
#       finds the references to GLIBC by scanning, as for any package.
set -euo pipefail
export PATH=/usr/bin:/bin
trap 'echo "debian-closure.sh: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

die() {
    echo "debian-closure.sh: $*" >&2
    exit 1
}

is_elf() {
    [[ -f $1 && ! -L $1 && $(head -c 4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]
}

glibc() {
    mkdir -p "$out/lib"
    dpkg -L libc6 | grep -E '^/(usr/)?lib/x86_64-linux-gnu/[^/]+\.so[.0-9]*$' >libs
    xargs cp -L -t "$out/lib/" <libs
    [[ -e $out/lib/ld-linux-x86-64.so.2 ]] || die "libc6 has no ld-linux-x86-64.so.2"
}

programs() {
    local glibc=$1
    shift
    local loader=$glibc/lib/ld-linux-x86-64.so.2
    [[ -x $loader ]] || die "$loader: not a dynamic loader"
    local spec src dest
    for spec in "$@"; do
        src=${spec%%:*}
        dest=$out/${spec#*:}
        [[ -e $src ]] || die "$src: not found (is its Debian package installed?)"
        mkdir -p "$(dirname "$dest")"
        # Not -a: the store holds no setuid bits (util-linux's mount has one).
        cp -R "$src" "$dest"
    done
    chmod -R u+w "$out"
    mkdir -p "$out/lib"

    # Every library the ELF files need, resolved on this machine. ldd reports
    # the whole transitive set, so one pass over the copied files is enough;
    # libraries copied in are ELF files too and get the same patches below.
    # (Plain files, no process substitution: a builder must not leave children
    # behind when it exits.)
    local file name path
    find "$out" -type f -print0 >files
    : >needed
    while IFS= read -r -d '' file; do
        is_elf "$file" || continue
        # ldd fails on ELF files without dynamic dependencies; they need nothing.
        { ldd "$file" 2>/dev/null || true; } | sed -n 's/^\t\([^ ]*\) => \(\/[^ ]*\) .*/\1 \2/p' >>needed
    done <files
    sort -u needed >needed.sorted
    while read -r name path; do
        [[ -e $glibc/lib/$name ]] && continue
        [[ -e $out/lib/$name ]] || cp -L "$path" "$out/lib/$name"
    done <needed.sorted
    chmod -R u+w "$out"

    find "$out" -type f -print0 >files
    while IFS= read -r -d '' file; do
        is_elf "$file" || continue
        if patchelf --print-interpreter "$file" >/dev/null 2>&1; then
            patchelf --set-interpreter "$loader" "$file"
        fi
        # Static executables have no dynamic section to carry a RUNPATH.
        if patchelf --print-needed "$file" >/dev/null 2>&1; then
            patchelf --set-rpath "$out/lib:$glibc/lib" "$file"
        fi
    done <files
}

: "${out:?debian-closure.sh runs as a nix-build builder (\$out unset)}"
case ${1:-} in
glibc) glibc ;;
programs)
    shift
    programs "$@"
    ;;
*) die "usage: debian-closure.sh glibc | programs GLIBC SRC:DEST..." ;;
esac
