# A small system closure booted through `tvix-boot --init $out/init`: Debian's
# systemd made into store paths (debian-closure.sh), a stage-2 init that does
# what NixOS's stage-2-init.sh does before it execs systemd, and one unit that
# prints a marker once multi-user.target is reached and powers the VM off.
#
#   nix-build --option sandbox false --no-out-link tests/nix/systemd-system.nix
#
# Needs, on the build machine: nix-bin, systemd, busybox-static, patchelf.
{ busyboxStatic ? "/bin/busybox" }:
let
  system = builtins.currentSystem;
  bash = "/bin/bash";
  closure = ./debian-closure.sh;
  # A derivation built by a shell script. The script ends with a builtin: `bash -c`
  # execs a last external command in its own place, a coreutils program closes its
  # log pipe before it exits, and Nix 2.8 then kills the build (signal 9).
  script = name: text: derivation {
    inherit name system;
    builder = bash;
    args = [ "-c" "set -e\n${text}\ntrue" ];
  };

  glibc = derivation {
    name = "glibc-debian";
    inherit system;
    builder = bash;
    args = [ closure "glibc" ];
  };

  busybox = script "busybox-static" ''
    /bin/mkdir -p $out/bin
    /bin/cp ${busyboxStatic} $out/bin/busybox
    for a in sh env mkdir ln chmod cat echo; do /bin/ln -s busybox $out/bin/$a; done
  '';

  # PID 1, its shutdown helper, systemctl, the mount and umount it runs for
  # mount units (util-linux, at the paths Debian's build compiled in) and the
  # target units a boot to multi-user.target and a power-off go through.
  # Debian's other units are left out: they start daemons (journald, udevd,
  # logind, ...) this closure lacks.
  units = [
    "multi-user.target" "basic.target" "sysinit.target" "local-fs.target"
    "swap.target" "sockets.target" "timers.target" "paths.target" "slices.target"
    "shutdown.target" "umount.target" "final.target" "poweroff.target"
    "systemd-poweroff.service"
  ];
  systemd = derivation {
    name = "systemd-debian";
    inherit system;
    builder = bash;
    args = [ closure "programs" glibc
      "/lib/systemd/systemd:lib/systemd/systemd"
      "/lib/systemd/systemd-shutdown:lib/systemd/systemd-shutdown"
      "/bin/systemctl:bin/systemctl"
      "/bin/mount:bin/mount"
      "/bin/umount:bin/umount"
    ] ++ map (u: "/lib/systemd/system/${u}:lib/systemd/system/${u}") units;
  };

  marker = script "tvix-boot-marker" ''
      /bin/mkdir -p $out/bin
      /bin/cat > $out/bin/marker <<EOF
      #!${busybox}/bin/sh
      read uptime _ < /proc/uptime
      echo "tvix-boot-systemd-marker: multi-user.target is \$(${systemd}/bin/systemctl is-active multi-user.target), uptime \$uptime s"
      # No logind in this system to ask about inhibitors.
      exec ${systemd}/bin/systemctl poweroff --no-block --check-inhibitors=no
      EOF
      /bin/chmod 555 $out/bin/marker
  '';

  etc = script "etc" ''
      PATH=/usr/bin:/bin
      mkdir -p $out/etc/systemd/system/multi-user.target.wants
      cd $out/etc
      printf 'NAME="tvix-boot test system"\nID=tvix-boot-test\n' > os-release
      printf 'root:x:0:0:root:/root:${busybox}/bin/sh\nnobody:x:65534:65534:nobody:/:/noshell\n' > passwd
      printf 'root:x:0:\nnogroup:x:65534:\n' > group
      cd systemd/system
      ln -s ${systemd}/lib/systemd/system/multi-user.target default.target
      cat > tvix-boot-marker.service <<EOF
      [Unit]
      Description=Print the tvix-boot marker and power off
      After=multi-user.target

      [Service]
      Type=oneshot
      ExecStart=${marker}/bin/marker
      StandardOutput=tty
      StandardError=tty
      TTYPath=/dev/console
      TTYReset=no
      TTYVHangup=no
      EOF
      ln -s ../tvix-boot-marker.service multi-user.target.wants/
  '';
in
script "tvix-boot-test-system" ''
    /bin/mkdir -p $out
    /bin/cat > $out/init <<EOF
    #!${busybox}/bin/sh
    # Stage 2: what NixOS's stage-2-init.sh does, in small. The guest init has
    # mounted /dev, /proc and /sys and put the store at /nix/store in a tmpfs root.
    export PATH=${busybox}/bin:${systemd}/bin
    mkdir -p /etc /run /var/log /var/tmp /tmp /root /bin /usr/bin /lib
    chmod 1777 /tmp /var/tmp
    # /etc: links into the system's etc, through /etc/static as on NixOS.
    ln -sfn ${etc}/etc /etc/static
    for f in ${etc}/etc/*; do ln -sfn "/etc/static/\''${f##*/}" /etc/; done
    # The paths Debian's systemd was built with: units under /lib/systemd/system,
    # /lib/systemd/systemd-shutdown exec'd at power-off, /bin/(u)mount for mount units.
    ln -sfn ${systemd}/lib/systemd /lib/systemd
    ln -sfn ${systemd}/bin/mount /bin/mount
    ln -sfn ${systemd}/bin/umount /bin/umount
    ln -sfn ${busybox}/bin/sh /bin/sh
    ln -sfn ${busybox}/bin/env /usr/bin/env
    echo "stage 2: starting systemd"
    exec ${systemd}/lib/systemd/systemd "\$@"
    EOF
    /bin/chmod 555 $out/init
    /bin/ln -s ${etc} $out/etc
    /bin/ln -s ${systemd} $out/systemd
''
