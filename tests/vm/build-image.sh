#!/usr/bin/env bash
# Builds the Debian bookworm disk image of the VM test (tests/vm.rs): systemd, a static
# network set-up for qemu's user network, the kubeconfig pointing at the guestfwd address, and
# the units that run kreboot the way the DaemonSet runs it. The kreboot binary itself is not in
# the image: the test writes it into a copy (debugfs) for every run, so this image only changes
# when this script does (the test caches it outside the clone, under
# ${KREBOOT_CACHE:-~/.cache/kreboot}/vm-image-<hash of this script>/).
#
# Usage: build-image.sh OUT_DIR   (writes OUT_DIR/disk.ext4, OUT_DIR/vmlinuz, OUT_DIR/initrd.img)
set -euo pipefail
out=$1
mirror=${KREBOOT_VM_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d "${out%/}.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# The kernel and its initrd come from the image itself, so its /lib/modules matches.
debootstrap --variant=minbase --include=systemd-sysv,udev,linux-image-amd64,apparmor bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

echo kreboot-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 kreboot-vm\n' >"$root/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"

# qemu's user network: 10.0.2.15, gateway 10.0.2.2; with restrict=on the only reachable
# address is the guestfwd rule 10.0.2.100:6443 (the simulated API server on the host).
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-qemu.network" <<'NET'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
NET

mkdir -p "$root/etc/kreboot"
cat >"$root/etc/kreboot/kubeconfig" <<'KC'
apiVersion: v1
kind: Config
clusters:
- name: sim
  cluster:
    server: http://10.0.2.100:6443
contexts:
- name: sim
  context:
    cluster: sim
    user: sim
current-context: sim
users:
- name: sim
  user: {}
KC

# The agent's root: the static binary (written by the test) and empty mount points, nothing
# else; no shell, no systemctl, no libraries.
kroot=$root/opt/kreboot-root
mkdir -p "$kroot"/{proc,sys,dev,tmp,etc/kreboot,host/var/run}
touch "$kroot/etc/kreboot/kubeconfig"

# AppArmor as on an Ubuntu (or Debian) node: Debian's kernel enables it and the apparmor package
# loads /etc/apparmor.d at boot. The profile below confines a process the way the container
# runtimes' default profile confines a pod that asks for none (containerd names it
# cri-containerd.apparmor.d, and so does this one, so the agent's message reads as on a node).
# Written for this test from what that default allows and denies: everything a container
# usually does (network, file access, the capabilities it was given), no mount, no writes into
# the kernel's /proc and /sys knobs, and ptrace and signals only between processes under the
# same profile. PID 1 is unconfined: opening /proc/1/ns/* (a ptrace read) and signalling it are
# refused whatever the capabilities. The test confines the agent with it through a drop-in
# (AppArmorProfile=) on the run that shows the preflight's refusal.
cat >"$root/etc/apparmor.d/cri-containerd.apparmor.d" <<'PROFILE'
#include <tunables/global>

profile cri-containerd.apparmor.d flags=(attach_disconnected,mediate_deleted) {
  #include <abstractions/base>

  network,
  capability,
  file,
  umount,

  # Signals: from unconfined host processes, and among processes of this profile only.
  signal (receive) peer=unconfined,
  signal (send,receive) peer=cri-containerd.apparmor.d,
  # ptrace (and so reading another process's /proc/PID/ns): within this profile only.
  ptrace (trace,read,tracedby,readby) peer=cri-containerd.apparmor.d,

  deny mount,
  deny @{PROC}/* w,
  deny @{PROC}/sys/[^k]** w,
  deny @{PROC}/sysrq-trigger rwklx,
  deny @{PROC}/kcore rwklx,
  deny /sys/[^f]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
}
PROFILE

u=$root/etc/systemd/system
# First boot only: the sentinel appears in /run (a tmpfs, so it is gone after the reboot), as
# unattended-upgrades would write it. Every boot prints its boot id on the console.
cat >"$u/vmtest-sentinel.service" <<'UNIT'
[Unit]
Description=VM test: reboot-required sentinel on the first boot
DefaultDependencies=no
After=local-fs.target apparmor.service
Before=kreboot-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
StandardOutput=journal+console
ExecStart=/bin/sh -c 'echo "VMTEST: apparmor enabled=$(cat /sys/module/apparmor/parameters/enabled) runtime-default-loaded=$(grep -c "^cri-containerd.apparmor.d " /sys/kernel/security/apparmor/profiles)"'
ExecStart=/bin/sh -c 'echo "VMTEST: boot_id=$(cat /proc/sys/kernel/random/boot_id)"; if [ -e /var/lib/vmtest/first-boot-done ]; then echo "VMTEST: later boot, no sentinel"; else mkdir -p /var/lib/vmtest && touch /var/lib/vmtest/first-boot-done && sync && echo "*** System restart required ***" >/run/reboot-required && echo "VMTEST: first boot, sentinel created"; fi'

[Install]
WantedBy=multi-user.target
UNIT

# As the DaemonSet runs it: its own mount namespace whose root holds only the binary, the
# kubeconfig and the host's /var/run read-only at /host/var/run; the host's PID namespace (PID 1
# visible); the DaemonSet's three capabilities. The reboot must go through setns into PID 1's
# namespaces: nothing in this root can reach systemd. KREBOOT_REBOOT_METHOD comes from the
# kernel command line (systemd.setenv=), chosen by the test.
cat >"$u/kreboot-agent.service" <<'UNIT'
[Unit]
Description=kreboot agent (as the DaemonSet runs it)
Wants=network-online.target
After=network-online.target vmtest-sentinel.service

[Service]
RootDirectory=/opt/kreboot-root
MountAPIVFS=yes
BindReadOnlyPaths=/etc/kreboot/kubeconfig:/etc/kreboot/kubeconfig
BindReadOnlyPaths=/run:/host/var/run
Environment=KUBECONFIG=/etc/kreboot/kubeconfig
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_SYS_PTRACE
NoNewPrivileges=yes
ExecStart=/kreboot agent --node-name kreboot-vm --namespace kube-system --sentinel-file /host/var/run/reboot-required --metrics-addr off
Restart=on-failure
RestartSec=2
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT

chroot "$root" systemctl enable systemd-networkd.service systemd-networkd-wait-online.service \
  apparmor.service vmtest-sentinel.service kreboot-agent.service >/dev/null 2>&1
# Nothing the test does not need: no login prompts, no timers, no drivers for hardware the VM
# lacks (every boot is emulated instruction by instruction).
chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service getty-static.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
  >/dev/null 2>&1 || true
printf 'blacklist %s\n' kvm kvm_amd kvm_intel cfg80211 floppy pcspkr joydev evdev \
  >"$root/etc/modprobe.d/vmtest.conf"
kver=$(ls "$root/lib/modules" | sort -V | tail -1)
for d in sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging \
  drivers/bluetooth drivers/iio drivers/hid drivers/usb net/wireless net/bluetooth; do
  rm -rf "$root/lib/modules/$kver/kernel/$d"
done
chroot "$root" depmod -a "$kver"

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
mkdir -p "$out"
cp "$kernel" "$out/vmlinuz.tmp"
cp "$initrd" "$out/initrd.img.tmp"
mkfs.ext4 -q -F -L kreboot-vm -d "$root" "$out/disk.ext4.tmp" 1536M
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/disk.ext4.tmp" "$out/disk.ext4"
echo "image: $out/disk.ext4 ($(du -sh "$root" | cut -f1) of files), kernel $(basename "$kernel")"
