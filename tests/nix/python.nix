# Debian's CPython 3.11 as a Nix-style closure: the interpreter, its standard
# library (~1,900 files) and C extension modules, patchelf'd onto a glibc in the
# store by debian-closure.sh. Run with `tvix-boot --run $out/bin/python3.11`.
#
#   nix-build --option sandbox false --no-out-link tests/nix/python.nix
#
# Needs, on the build machine: nix-bin, python3.11, patchelf.
let
  system = builtins.currentSystem;
  bash = "/bin/bash";
  closure = ./debian-closure.sh;

  glibc = derivation {
    name = "glibc-debian";
    inherit system;
    builder = bash;
    args = [ closure "glibc" ];
  };
in
derivation {
  name = "python3-debian";
  inherit system;
  builder = bash;
  args = [ closure "programs" glibc
    "/usr/bin/python3.11:bin/python3.11"
    "/usr/lib/python3.11:lib/python3.11"
  ];
}
