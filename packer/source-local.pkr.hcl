# The local target: the base disk booted under qemu, provisioned over SSH,
# saved as a qcow2 next to the kernel and initrd it boots with.
source "qemu" "local" {
  disk_image   = true
  iso_url      = var.base_disk
  iso_checksum = "none"
  format       = "qcow2"
  # The base is already as large as a run needs (baseimage.DISK_SIZE);
  # growing the disk would not grow its filesystem anyway.
  skip_resize_disk = true
  # Compaction rewrites the whole disk with qemu-img on every bake; a local
  # image is short-lived, so the space it would win is not worth the time.
  skip_compaction = true

  accelerator = var.accelerator
  headless    = true
  memory      = var.memory_mb
  cpus        = var.cpus

  disk_interface = "virtio"
  net_device     = "virtio-net"
  vm_name        = "disk.qcow2"

  output_directory = local.output_directory

  # Direct kernel boot, as the local runner boots the result: the base has
  # no boot loader. The key reaches the guest through fw_cfg, where
  # local-metadata.service installs it; nothing secret is in the disk.
  qemuargs = [
    ["-kernel", var.base_kernel],
    ["-initrd", var.base_initrd],
    ["-append", "root=/dev/vda rw console=ttyS0"],
    ["-fw_cfg", "name=opt/nightshift/ssh-key,file=${var.ssh_public_key_file}"],
    ["-serial", "file:${local.console_log}"],
    # The default forward listens on every interface; keep it on loopback.
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
  ]

  # Nothing to type at a boot prompt: direct kernel boot goes straight on.
  boot_wait = "0s"

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  # First boot under TCG with host key generation takes about a minute.
  ssh_timeout      = "10m"
  shutdown_command = "systemctl poweroff"
  shutdown_timeout = "5m"
}
