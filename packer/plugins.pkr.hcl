# Plugins for modern Packer (1.10+, installed with `packer init`).
# Debian's Packer 1.6.6 has these builders built in and rejects this block,
# so `invoke bake-ami` leaves this file out of the directory it stages for it.
packer {
  # 1.10 is the first release that bundles no plugins: what runs is exactly
  # what `packer init` installs from the constraints below.
  required_version = ">= 1.10.0"

  # Upper bounds: a major plugin release may rename the options used here.
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.0.0, < 2.0.0"
    }
    # 1.2.2 is the first with imds_support on amazon-ebs
    # (hashicorp/packer-plugin-amazon#346, #357).
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.2, < 2.0.0"
    }
    ansible = {
      source  = "github.com/hashicorp/ansible"
      version = ">= 1.0.0, < 2.0.0"
    }
  }
}
